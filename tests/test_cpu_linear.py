"""oneDNN linear layers with packed weights (engine/cpu_linear.py) against torch's own, and an engine running on
them against a plain transformers forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import assert_matches_reference, ragged_requests, reference_model  # noqa: F401 (fixture)
from torch import nn

from services.teacher.engine import cpu_linear, load_engine

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (37, 48), (2, 5, 48)])
def test_packed_linear_equals_torch_linear(bias, shape):
    """float32 to rounding; bfloat16 bit for bit (both are oneDNN there)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want, got = lin(x), cpu_linear.PackedLinear(lin)(x)
    assert got.shape == want.shape == (*shape[:-1], 80)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if cpu_linear.packs_bfloat16():
        lin16, x16 = lin.to(torch.bfloat16), x.to(torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(cpu_linear.PackedLinear(lin16)(x16), lin16(x16))


def test_pack_linears_replaces_every_linear():
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(8, 3))
    )
    x = torch.randn(4, 8)
    with torch.inference_mode():
        want = net(x)
        assert cpu_linear.pack_linears(net) == 2
        assert not any(isinstance(m, torch.nn.Linear) for m in net.modules())
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)


def test_choose():
    cpu, lin = torch.device("cpu"), torch.nn.Linear(64, 96)
    assert cpu_linear.choose("torch", cpu, lin) == "torch"
    assert cpu_linear.choose("onednn", cpu, lin) == "onednn"
    assert cpu_linear.choose("auto", torch.device("cuda"), lin) == "torch"  # CPU engines only
    assert cpu_linear.choose("auto", cpu, torch.nn.Embedding(4, 4)) == "torch"  # not a plain Linear
    auto, why = cpu_linear.choose_why("auto", cpu, lin)
    verdict = cpu_linear.onednn_probe(torch.float32, ((64, 96, 1),))
    assert auto == ("onednn" if verdict.faster else "torch") and why == f"probe: {verdict.why}"
    assert len(verdict.ratios) == cpu_linear.PROBE_TRIALS
    assert cpu_linear.choose("auto", cpu, torch.nn.Linear(64, 96)) == auto  # measured once per shape mix
    assert cpu_linear.choose("auto", cpu, torch.nn.Sequential(torch.nn.ReLU())) == "torch"  # no linear at all
    # bfloat16 runs on oneDNN either way where the CPU has its kernels: packing only saves the per-call reorder
    # (same numbers); on an AVX2-only CPU it stays on torch, and asking for oneDNN is a clear error
    lin16 = torch.nn.Linear(64, 96).to(torch.bfloat16)
    if cpu_linear.packs_bfloat16():
        assert cpu_linear.choose("auto", cpu, lin16) == "onednn"
    else:
        assert cpu_linear.choose("auto", cpu, lin16) == "torch"
        with pytest.raises(ValueError, match="bfloat16"):
            cpu_linear.choose("onednn", cpu, lin16)
    with pytest.raises(ValueError, match="cpu_linear"):
        cpu_linear.choose("mkl", cpu, lin)


def test_linear_shapes_and_probe_rows():
    """The probe's mix counts each projection shape of a module; its rows shrink as the shapes grow."""
    block = torch.nn.ModuleDict(
        {"q": nn.Linear(8, 8), "o": nn.Linear(8, 8), "up": nn.Linear(8, 32), "down": nn.Linear(32, 8)}
    )
    assert cpu_linear.linear_shapes(block) == {(8, 8): 2, (8, 32): 1, (32, 8): 1}
    assert cpu_linear.linear_shapes(nn.Linear(3, 5)) == {(3, 5): 1}
    assert cpu_linear.probe_rows({(8, 8): 1}) == 1024
    assert cpu_linear.probe_rows({(576, 49152): 1}) == 128  # 2 x 576 x 49,152 x 128 ~ PROBE_FLOPS
    assert cpu_linear.probe_rows({(8192, 8192): 1}) == 64


def test_an_engine_on_onednn_matches_a_plain_forward(tiny_teacher, reference_model):  # noqa: F811
    engine = load_engine(str(tiny_teacher), cpu_linear="onednn", prompt_cache_mb=0)
    assert engine.linear_kernels == "onednn"
    assert isinstance(engine.lm_head, cpu_linear.PackedLinear)
    reqs = ragged_requests(engine.info.vocab_size, n=8, seed=11, top_k=5, full=True)
    for req, res in zip(reqs, engine.score(reqs), strict=True):
        assert_matches_reference(reference_model, req, res)
    torch_engine = load_engine(str(tiny_teacher), cpu_linear="torch", prompt_cache_mb=0)
    assert torch_engine.linear_kernels == "torch"
    a, b = engine.score(reqs), torch_engine.score(reqs)
    diff = max(float(np.abs(x.token_logprobs - y.token_logprobs).max()) for x, y in zip(a, b, strict=True))
    assert diff < 1e-4


@pytest.mark.skipif(not cpu_linear.packs_bfloat16(), reason="this CPU has no oneDNN bfloat16 kernel")
def test_a_float32_head_over_a_bfloat16_trunk_on_bfloat16_units(tiny_teacher, reference_model):  # noqa: F811
    settings = dict(dtype="bfloat16", lm_head_dtype="float32", cpu_linear="onednn", prompt_cache_mb=0)
    engine = load_engine(str(tiny_teacher), **settings)
    assert (engine.linear_kernels, engine.head_kernels) == ("onednn", "onednn bf16 units")
    assert isinstance(engine.lm_head, cpu_linear.BfloatValuedLinear)
    reqs = ragged_requests(engine.info.vocab_size, n=4, seed=12)
    for req, res in zip(reqs, engine.score(reqs), strict=True):
        # bfloat16 trunk: loose, but a real check
        assert_matches_reference(reference_model, req, res, tol=0.5)
    # the same engine with its float32 head on torch's float32 kernels: equal up to summation order
    plain = load_engine(str(tiny_teacher), **settings)
    plain.lm_head = plain.lm_head.linear
    reqs = ragged_requests(engine.info.vocab_size, n=4, seed=12, top_k=5)
    for a, b in zip(engine.score(reqs), plain.score(reqs), strict=True):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=2e-5, rtol=0)
        np.testing.assert_allclose(a.top_k_logprobs, b.top_k_logprobs, atol=2e-5, rtol=0)


@pytest.mark.skipif(not cpu_linear.packs_bfloat16(), reason="this CPU has no oneDNN bfloat16 kernel")
def test_bfloat_valued_linear_is_a_float32_product():
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(256, 4096, bias=False)
    linear.weight.data = (torch.randn(4096, 256, generator=g) * 0.05).bfloat16().float()
    x_ND = torch.randn(64, 256, generator=g).bfloat16().float()
    before = torch.backends.mkldnn.matmul.fp32_precision
    with torch.inference_mode():
        y_NV = cpu_linear.BfloatValuedLinear(linear)(x_ND)
    assert torch.backends.mkldnn.matmul.fp32_precision == before  # the process's flag is restored
    ref_NV = x_ND.double() @ linear.weight.double().T
    assert y_NV.dtype == torch.float32
    assert (
        y_NV.double() - ref_NV
    ).abs().max() < 1e-5  # float32 accumulation; bfloat16 outputs would be ~1e-2 off
    linear.weight.data += 1e-4  # no longer bfloat16 values: rounding them would change the product
    with pytest.raises(ValueError, match="bfloat16 values"):
        cpu_linear.BfloatValuedLinear(linear)


def pairs(*ratios: float, base: float = 1.0) -> list[list[tuple[float, float]]]:
    """Trials of 5 interleaved (baseline_s, candidate_s) timings whose best times are in ratio `ratios[i]`; each
    trial's other rounds are noisier (slower) on both sides."""
    return [[(base * (1 + 0.1 * k), base / r * (1 + 0.1 * k)) for k in range(5)] for r in ratios]


def test_the_probe_decision_takes_the_candidate_only_when_every_trial_agrees():
    """`decide` over timings (a pure function): the candidate (oneDNN, blocked attention) only when it is at least
    the margin faster by best time in the median trial, the margin slower in none, and wins most pairs; slower, inside the margin, trials that
    disagree (a probe on a busy machine) or no timings keep the default, and the reason says which."""
    from services.teacher.engine.cpu_linear import decide

    take = decide(pairs(1.3, 1.25, 1.4), 1.05)
    assert (
        take.faster and take.ratios == pytest.approx((1.3, 1.25, 1.4)) and take.speedup == pytest.approx(1.3)
    )
    assert take.won == take.pairs == 15 and "median x1.30 >= x1.05" in take.why
    near = decide(pairs(1.06, 1.12, 1.19), 1.1)  # one trial inside the margin, none the other way
    assert near.faster and near.speedup == pytest.approx(1.12)
    assert decide(pairs(0.99, 1.15, 1.2), 1.1).faster  # one trial a hair the other way: noise, not a verdict
    slower = decide(pairs(0.8, 0.9, 0.85), 1.05)
    assert not slower.faster and "the default" in slower.why and "ambiguous" not in slower.why
    inside = decide(pairs(1.02, 1.04, 1.03), 1.05)  # faster, but within the margin: two equal kernels
    assert not inside.faster and "under x1.05" in inside.why
    busy = decide(
        pairs(1.6, 0.9, 1.3), 1.05
    )  # one trial read the other way: the machine decided, not the kernel
    assert not busy.faster and busy.why.startswith("ambiguous")
    # the best times agree but the candidate loses most pairs: its best was one lucky round
    lucky = [[(1.0, 0.7)] + [(1.0, 1.5)] * 4 for _ in range(3)]
    assert not decide(lucky, 1.05).faster and decide(lucky, 1.05).why.startswith("ambiguous")
    assert not decide([], 1.05).faster and decide([], 1.05).speedup == 0.0
    assert decide(pairs(1.3), 1.05).faster  # one trial: its own verdict


def test_the_probe_times_interleaved_trials_in_alternating_order():
    """`time_pairs`: one warm-up call of each, then trials x rounds pairs, the two sides alternating which runs
    first (so a noisy stretch falls on both)."""
    calls = []
    out = cpu_linear.time_pairs(lambda: calls.append("b"), lambda: calls.append("c"), trials=2, rounds=3)
    assert [len(t) for t in out] == [3, 3] and all(b >= 0 and c >= 0 for t in out for b, c in t)
    assert calls == ["b", "c"] + ["b", "c", "c", "b", "b", "c"] * 2
