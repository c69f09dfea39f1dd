"""Blocked CPU attention (engine/cpu_attention.py) against attention written out in float64, and an engine running
on it against a plain transformers forward (with prompt reuse too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import TOL_F32, assert_matches_reference, ragged_requests
from test_prompt_kv import shared_prompt_requests

from services.teacher.engine import cpu_attention, load_engine


def reference(q_BhQd, k_BkKd, v_BkKd, mask_B1QK, scaling, causal):
    """softmax(q k^T * scaling + mask) v in float64, key/value heads repeated, causality bottom-right aligned."""
    q, k, v = (t.double() for t in (q_BhQd, k_BkKd, v_BkKd))
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    Q, K = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) * scaling
    if mask_B1QK is not None:
        s = s.masked_fill(~mask_B1QK, float("-inf")) if mask_B1QK.dtype == torch.bool else s + mask_B1QK
    elif causal:
        s = s.masked_fill(torch.ones(Q, K, dtype=torch.bool).triu(K - Q + 1), float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)  # (B, Q, h, d)


def padded_causal_mask(lengths, Q, K):
    """(B, 1, Q, K) boolean: causal (queries are the last Q of K positions) and keys within each row's length."""
    q_idx = torch.arange(Q)[:, None] + (K - Q)
    kv = torch.arange(K)[None, :]
    valid_BK = kv < torch.tensor(lengths)[:, None]
    return ((kv <= q_idx)[None] & valid_BK[:, None, :])[:, None]


def qkv(B, h, k, Q, K, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*shape, generator=g).to(dtype) for shape in ((B, h, Q, d), (B, k, K, d), (B, k, K, d))
    ]


CASES = {
    # name: (B, h, k, Q, K, mask builder or None, causal)
    "causal, no mask, grouped heads": (2, 6, 2, 70, 70, None, True),
    "causal, no mask, one query per key head": (1, 3, 3, 33, 33, None, True),
    "right padding": (3, 4, 2, 45, 45, lambda: padded_causal_mask([45, 30, 1], 45, 45), True),
    "cached prefix with holes": (2, 4, 1, 20, 50, lambda: padded_causal_mask([50, 38], 20, 50), True),
    "additive mask": (2, 4, 2, 40, 40, lambda: torch.randn(2, 1, 40, 40), False),
    "not causal": (2, 4, 2, 37, 37, None, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_float64(case):
    B, h, k, Q, K, make_mask, causal = CASES[case]
    q, kk, v = qkv(B, h, k, Q, K)
    mask = make_mask() if make_mask else None
    want = reference(q, kk, v, mask, 0.25, causal)
    got = cpu_attention.attention(q, kk, v, mask, 0.25, causal=causal)
    assert got.shape == (B, Q, h, q.shape[-1]) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=2e-6), (got.double() - want).abs().max()


def test_attention_bfloat16_close_to_float64():
    q, k, v = qkv(2, 6, 2, 70, 70, dtype=torch.bfloat16)
    want = reference(q, k, v, None, 0.25, True)
    got = cpu_attention.attention(q, k, v, None, 0.25)
    assert got.dtype == torch.bfloat16
    err = (got.double() - want).abs()
    assert err.max() < 0.05 and err.mean() < 0.005, (err.max(), err.mean())


def test_a_fully_masked_row_gives_zeros_not_nan():
    q, k, v = qkv(1, 2, 1, 4, 4)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2, :] = False
    out = cpu_attention.attention(q, k, v, mask, 1.0, causal=False)
    assert torch.isfinite(out).all() and out[0, 2].abs().max() == 0


def test_choose():
    cpu, heads = torch.device("cpu"), (6, 2, 16)
    assert cpu_attention.choose("sdpa", cpu, torch.float32, *heads) == "sdpa"
    assert cpu_attention.choose("blocked", cpu, torch.float32, *heads) == "blocked"
    assert cpu_attention.choose("blocked", torch.device("cuda"), torch.bfloat16, *heads) == "sdpa"
    verdict = cpu_attention.blocked_probe(torch.float32, *heads)
    want = "blocked" if verdict.faster else "sdpa"
    assert cpu_attention.choose("auto", cpu, torch.float32, *heads) == want  # measured once per shape
    assert cpu_attention.choose_why("auto", cpu, torch.float32, *heads) == (want, f"probe: {verdict.why}")
    with pytest.raises(ValueError, match="cpu_attention"):
        cpu_attention.choose("flash", cpu, torch.float32, *heads)


def test_engine_rejects_an_unknown_attention(tiny_teacher):
    with pytest.raises(ValueError, match="cpu_attention"):
        load_engine(str(tiny_teacher), cpu_attention="flash")


@pytest.fixture(scope="module")
def reference_model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


def test_engine_on_blocked_attention_matches_a_plain_forward(tiny_teacher, reference_model):
    engine = load_engine(str(tiny_teacher), cpu_attention="blocked", prompt_cache_mb=16)
    assert engine.attention == "blocked"
    assert engine.model.config._attn_implementation.startswith(
        cpu_attention.NAME
    )  # maybe wrapped: flat_reuse
    reqs = ragged_requests(engine.info.vocab_size, n=8, seed=7, top_k=4)  # a padded batch
    shared = shared_prompt_requests(engine.info.vocab_size, seed=3, top_k=4)
    worst = 0.0
    for batch in (reqs, shared, shared):  # the second `shared` reuses every prompt (a cached prefix + holes)
        for req, res in zip(batch, engine.score(batch), strict=True):
            worst = max(worst, assert_matches_reference(reference_model, req, res, TOL_F32))
    assert sum(engine.last_reused) > 0
    print(f"blocked attention engine vs plain forward: max abs diff {worst:.3g}")


def test_bfloat16_blocked_attention_as_accurate_as_sdpa(tiny_teacher):
    """In bfloat16 both attentions err against float32 (the trunk's rounding dominates); blocked no more than sdpa
    beyond noise."""
    reqs = ragged_requests(512, n=8, seed=9)

    def token_logprobs(**kw):
        engine = load_engine(str(tiny_teacher), prompt_cache_mb=0, **kw)
        return engine, np.concatenate([r.token_logprobs for r in engine.score(reqs)])

    _, exact = token_logprobs(dtype="float32", cpu_linear="torch")
    sdpa, a = token_logprobs(dtype="bfloat16", cpu_attention="sdpa")
    blocked, b = token_logprobs(dtype="bfloat16", cpu_attention="blocked")
    assert (sdpa.attention, blocked.attention) == ("sdpa", "blocked")
    err_sdpa, err_blocked = np.abs(a - exact), np.abs(b - exact)
    print(
        f"bfloat16 vs float32, mean/max abs: sdpa {err_sdpa.mean():.4f}/{err_sdpa.max():.3f}, "
        f"blocked {err_blocked.mean():.4f}/{err_blocked.max():.3f}"
    )
    assert err_blocked.mean() < 1.3 * err_sdpa.mean() and err_blocked.max() < 2 * err_sdpa.max()
