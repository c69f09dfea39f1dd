"""The `hf` engine against plain transformers forward passes over each unpadded sequence.

The reference (`reference_logprobs`) runs `AutoModelForCausalLM` on one sequence at a time, with no padding,
no attention mask and no position ids, and applies log_softmax(logits / temperature) in float32: everything
the engine does with padding, masks, position ids, gathering scored positions and chunking must reproduce it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.teacher.engine import hf as hf_module
from services.teacher.engine import load_engine
from services.teacher.engine.base import split_by_tokens
from services.teacher.errors import InvalidRequest
from services.teacher.types import ScoreRequest, ScoreResult

TOL_F32 = 1e-4
TOL_BATCH = 1e-5


@pytest.fixture(scope="module")
def engine(tiny_teacher):
    """Prompt reuse off: these tests pin the plain padded pass (tests/test_prompt_kv.py covers reuse)."""
    return load_engine(str(tiny_teacher), prompt_cache_mb=0)


@pytest.fixture(scope="module")
def reference_model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


def reference_logprobs(model, prompt, completion, temperature=1.0) -> np.ndarray:
    """(T, V) float32 log p(. | prompt, c_<t) from one unpadded forward pass of the whole model."""
    ids = torch.tensor([list(prompt) + list(completion)], dtype=torch.long)
    with torch.no_grad():
        logits_SV = model(input_ids=ids).logits[0].float()
    P, T = len(prompt), len(completion)
    rows_TV = logits_SV[P - 1 : P + T - 1]
    return torch.log_softmax(rows_TV / temperature, dim=-1).numpy()


def ragged_requests(vocab: int, n: int = 8, seed: int = 0, **kw) -> list[ScoreRequest]:
    """`n` requests with prompts of 1..~30 tokens and completions of 1..~20 tokens (all lengths differ)."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        p = int(rng.integers(1, 30))
        t = int(rng.integers(1, 20))
        reqs.append(
            ScoreRequest(
                rng.integers(0, vocab, size=p),
                rng.integers(0, vocab, size=t),
                request_id=f"r{i}",
                **kw,
            )
        )
    # Extremes: one-token prompt and one-token completion.
    reqs[0] = ScoreRequest(
        [int(rng.integers(0, vocab))], [int(rng.integers(0, vocab))], request_id="r0", **kw
    )
    return reqs


def assert_matches_reference(model, req: ScoreRequest, res: ScoreResult, tol: float = TOL_F32) -> float:
    """Checks token logprobs, top-k and full rows of `res` against the reference; returns the max abs diff."""
    ref_TV = reference_logprobs(model, req.prompt_token_ids, req.completion_token_ids, req.temperature)
    T = req.completion_token_ids.size
    assert res.request_id == req.request_id
    assert res.token_logprobs.dtype == np.float32 and res.token_logprobs.shape == (T,)
    ref_tok = ref_TV[np.arange(T), req.completion_token_ids]
    diffs = [np.abs(res.token_logprobs - ref_tok).max()]
    if req.top_k:
        k = req.top_k
        assert res.top_k_ids.shape == (T, k) and res.top_k_ids.dtype == np.int32
        assert res.top_k_logprobs.shape == (T, k) and res.top_k_logprobs.dtype == np.float32
        ref_sorted = -np.sort(-ref_TV, axis=1)[:, :k]
        diffs.append(np.abs(res.top_k_logprobs - ref_sorted).max())
        # The ids must point at rows' values (ties aside, they are the reference's argsort).
        diffs.append(np.abs(np.take_along_axis(ref_TV, res.top_k_ids.astype(np.int64), 1) - ref_sorted).max())
        ref_ids = np.argsort(-ref_TV, axis=1, kind="stable")[:, :k]
        gaps = np.abs(np.diff(-np.sort(-ref_TV, axis=1)[:, : k + 1], axis=1))  # (T, k)
        clear = gaps > 1e-3  # a position whose value is well separated from the next has a unique id
        assert np.array_equal(res.top_k_ids[clear], ref_ids[clear])
        assert np.all(np.diff(res.top_k_logprobs, axis=1) <= 0), "top-k must be sorted descending"
    else:
        assert res.top_k_ids is None and res.top_k_logprobs is None
    if req.full:
        full = res.full_float32()
        assert full.shape == ref_TV.shape
        if req.full_dtype == "float32":
            diffs.append(np.abs(full - ref_TV).max())
    else:
        assert res.full_logprobs is None
    worst = float(max(diffs))
    assert worst <= tol, f"{req.request_id}: max abs diff {worst:.3g} > {tol}"
    return worst


def test_mixed_batch_matches_reference(engine, reference_model):
    V = engine.info.vocab_size
    reqs = ragged_requests(V, n=8, seed=1)
    # Mixed options in one batch: top-k of several sizes, full rows, temperatures != 1.
    options = [
        dict(top_k=5),
        dict(top_k=0, full=True),
        dict(top_k=3, temperature=0.7),
        dict(top_k=10, full=True, temperature=2.5),
        dict(),
        dict(top_k=1, temperature=0.3),
        dict(full=True, temperature=1.3),
        dict(top_k=64),
    ]
    reqs = [
        ScoreRequest(r.prompt_token_ids, r.completion_token_ids, request_id=r.request_id, **o)
        for r, o in zip(reqs, options, strict=True)
    ]
    results = engine.score(reqs)
    assert len(results) == len(reqs)
    worst = max(assert_matches_reference(reference_model, q, r) for q, r in zip(reqs, results, strict=True))
    assert all(r.batch_size == len(reqs) for r in results), "all eight must share one forward pass"
    print(f"max abs diff vs transformers: {worst:.3g}")


def test_logprobs_are_normalised(engine):
    """Full rows are log-probabilities: logsumexp of each row is 0 (at any temperature)."""
    V = engine.info.vocab_size
    req = ScoreRequest([1, 2, 3], list(range(10, 20)), full=True, temperature=0.5)
    full = engine.score_one(req).full_float32()
    lse = torch.logsumexp(torch.from_numpy(full).double(), dim=-1).numpy()
    assert full.shape == (10, V)
    np.testing.assert_allclose(lse, 0.0, atol=1e-5)


def test_batch_invariance(engine):
    """A sequence gives the same numbers alone and inside a batch of 8 ragged sequences."""
    V = engine.info.vocab_size
    reqs = ragged_requests(V, n=8, seed=2, top_k=8, full=True, temperature=0.9)
    batched = engine.score(reqs)
    assert all(r.batch_size == 8 for r in batched)
    worst = 0.0
    for req, in_batch in zip(reqs, batched, strict=True):
        (alone,) = engine.score([req])
        assert alone.batch_size == 1
        for a, b in (
            (alone.token_logprobs, in_batch.token_logprobs),
            (alone.top_k_logprobs, in_batch.top_k_logprobs),
            (alone.full_logprobs, in_batch.full_logprobs),
        ):
            worst = max(worst, float(np.abs(a - b).max()))
        gaps = np.diff(alone.top_k_logprobs, axis=1)
        if np.all(np.abs(gaps) > 1e-4):  # no near-ties: ids must agree exactly
            assert np.array_equal(alone.top_k_ids, in_batch.top_k_ids)
    assert worst <= TOL_BATCH, f"alone vs in batch: max abs diff {worst:.3g}"
    print(f"batch invariance max abs diff: {worst:.3g}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_full_rows_low_precision_are_rounded_float32(engine, reference_model, dtype):
    """float16 / bfloat16 rows are the float32 rows rounded to that dtype (round-to-nearest)."""
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    prompt, completion = [5, 6, 7, 8], [40, 41, 42, 43, 44, 45]
    req32 = ScoreRequest(prompt, completion, full=True, request_id="f32")
    reqlo = ScoreRequest(prompt, completion, full=True, full_dtype=dtype, request_id="lo")
    r32, rlo = engine.score([req32, reqlo])
    assert rlo.full_dtype == dtype
    expected_storage = np.uint16 if dtype == "bfloat16" else np.float16
    assert rlo.full_logprobs.dtype == expected_storage
    rounded = torch.from_numpy(r32.full_logprobs).to(torch_dtype).float().numpy()
    np.testing.assert_array_equal(rlo.full_float32(), rounded)
    # And against the independent reference, within the dtype's rounding error.
    ref = reference_logprobs(reference_model, prompt, completion)
    eps = torch.finfo(torch_dtype).eps
    assert np.all(np.abs(rlo.full_float32() - ref) <= np.abs(ref) * eps + TOL_F32)
    # token logprobs stay float32 whatever the full rows' dtype
    np.testing.assert_array_equal(rlo.token_logprobs, r32.token_logprobs)


def test_invalid_request_fails_alone(engine, reference_model):
    V = engine.info.vocab_size
    good = ragged_requests(V, n=3, seed=3, top_k=2)
    bad_vocab = ScoreRequest([1, 2], [3, V], request_id="bad-vocab")
    bad_topk = ScoreRequest([1, 2], [3, 4], request_id="bad-topk", top_k=engine.info.max_top_k + 1)
    reqs = [good[0], bad_vocab, good[1], bad_topk, good[2]]
    out = engine.score(reqs)
    assert len(out) == 5
    assert isinstance(out[1], InvalidRequest) and out[1].param == "completion_token_ids"
    assert str(V) in out[1].message
    assert isinstance(out[3], InvalidRequest) and out[3].param == "top_k"
    for i in (0, 2, 4):
        assert isinstance(out[i], ScoreResult)
        assert_matches_reference(reference_model, reqs[i], out[i])
    with pytest.raises(InvalidRequest) as info:
        engine.score_one(bad_vocab)
    assert info.value.param == "completion_token_ids"


def test_logit_chunking_matches_reference(engine, reference_model, monkeypatch):
    """With the LM head run on 3 rows at a time, requests straddle chunk boundaries; results are unchanged."""
    V = engine.info.vocab_size
    monkeypatch.setattr(hf_module, "LOGIT_CHUNK_ELEMENTS", 3 * V)
    reqs = ragged_requests(V, n=5, seed=4)
    reqs = [
        ScoreRequest(
            r.prompt_token_ids,
            r.completion_token_ids,
            request_id=r.request_id,
            top_k=4,
            full=(i % 2 == 0),
            temperature=1.0 + 0.25 * i,
        )
        for i, r in enumerate(reqs)
    ]
    for req, res in zip(reqs, engine.score(reqs), strict=True):
        assert_matches_reference(reference_model, req, res)


def test_logit_chunk_rows_per_device():
    """CPU chunks are sized for the cache, GPU chunks for few large GEMMs; never zero rows."""
    assert hf_module.logit_chunk_rows(torch.device("cpu"), 49152) == 170
    assert hf_module.logit_chunk_rows(torch.device("cuda"), 49152) == 1365
    assert hf_module.logit_chunk_rows(torch.device("cpu"), 10**9) == 1


def test_token_budget_splits_batches(tiny_teacher, reference_model):
    """A small max_batch_tokens splits the work into several forward passes with the same results."""
    small = load_engine(str(tiny_teacher), max_batch_tokens=64)
    V = small.info.vocab_size
    reqs = ragged_requests(V, n=8, seed=5, top_k=3)
    reqs = [r for r in reqs if r.num_tokens <= 64]
    out = small.score(reqs)
    sizes = [r.batch_size for r in out]
    assert max(sizes) < len(reqs), f"expected several batches, got sizes {sizes}"
    expected = split_by_tokens(reqs, 64, list(range(len(reqs))))
    assert sizes == [len(c) for c in expected for _ in c]
    for req, res in zip(reqs, out, strict=True):
        assert_matches_reference(reference_model, req, res)


def _req(n_tokens: int) -> ScoreRequest:
    """A request of `n_tokens` >= 2 tokens (one-token completion)."""
    return ScoreRequest([1] * (n_tokens - 1), [2])


@pytest.mark.parametrize(
    "lengths, budget, expected",
    [
        ([], 10, []),
        ([4], 3, [[0]]),  # a request over budget still forms its own chunk
        ([2, 2, 2, 2], 8, [[0, 1, 2, 3]]),  # 4 x 2 = 8 fits exactly
        ([2, 2, 2, 2, 2], 8, [[0, 1, 2, 3], [4]]),
        ([2, 5, 2], 10, [[0, 1], [2]]),  # padded cost: 3 x 5 = 15 > 10
        ([5, 2, 2], 10, [[0, 1], [2]]),
        ([3, 3, 9, 2], 9, [[0, 1], [2], [3]]),
        ([10, 10, 10], 10, [[0], [1], [2]]),
    ],
)
def test_split_by_tokens(lengths, budget, expected):
    reqs = [_req(n) for n in lengths]
    index = [100 + i for i in range(len(reqs))]
    chunks = split_by_tokens(reqs, budget, index)
    assert chunks == [[100 + i for i in c] for c in expected]


def test_split_by_tokens_with_reuse_counts_a_shared_prompt_once():
    # prompt of 8, completion of 2 (10 tokens): the first of a prompt is padded, the others cost their 2 tokens
    same = [ScoreRequest([5] * 8, [1, 2]) for _ in range(6)]
    assert split_by_tokens(same, 16, list(range(6)), reuse=True) == [[0, 1, 2, 3], [4, 5]]  # 10 + 3 x 2 = 16
    assert split_by_tokens(same, 16, list(range(6))) == [[i] for i in range(6)]  # 2 x 10 > 16
    # another prompt joins the padded pass: 2 x 10 + 2 = 22
    mixed = [ScoreRequest([5] * 8, [1, 2]), ScoreRequest([6] * 8, [1, 2]), ScoreRequest([5] * 8, [1, 2])]
    assert split_by_tokens(mixed, 22, [0, 1, 2], reuse=True) == [[0, 1, 2]]
    assert split_by_tokens(mixed, 21, [0, 1, 2], reuse=True) == [[0, 1], [2]]


def test_split_by_tokens_invariants():
    """Random lengths: chunks cover the index in order, fit the budget, and are greedy (maximal)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        budget = int(rng.integers(1, 60))
        lengths = rng.integers(2, 25, size=int(rng.integers(0, 15))).tolist()
        reqs = [_req(n) for n in lengths]
        chunks = split_by_tokens(reqs, budget, list(range(len(reqs))))
        assert [i for c in chunks for i in c] == list(range(len(reqs)))
        for ci, c in enumerate(chunks):
            cost = len(c) * max(lengths[i] for i in c)
            assert len(c) == 1 or cost <= budget
            if ci + 1 < len(chunks):  # adding the next request would have exceeded the budget
                nxt = chunks[ci + 1][0]
                assert (len(c) + 1) * max(lengths[i] for i in [*c, nxt]) > budget


def test_bfloat16_weights_close_to_float32(tiny_teacher, reference_model):
    """bfloat16 weights: close to float32 (loosely), and no further from it than plain transformers in bf16."""
    from transformers import AutoModelForCausalLM

    bf = load_engine(str(tiny_teacher), dtype="bfloat16")
    assert bf.info.dtype == "bfloat16"
    assert next(bf.model.parameters()).dtype == torch.bfloat16
    ref_bf16 = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.bfloat16).eval()
    V = bf.info.vocab_size
    reqs = ragged_requests(V, n=4, seed=6, top_k=5, full=True)
    worst = worst_plain = 0.0
    means = []
    for req, res in zip(reqs, bf.score(reqs), strict=True):
        assert res.token_logprobs.dtype == np.float32
        ref = reference_logprobs(reference_model, req.prompt_token_ids, req.completion_token_ids)
        plain = reference_logprobs(ref_bf16, req.prompt_token_ids, req.completion_token_ids)
        diff = np.abs(res.full_float32() - ref)
        worst, worst_plain = max(worst, float(diff.max())), max(worst_plain, float(np.abs(plain - ref).max()))
        means.append(float(diff.mean()))
        ref_tok = ref[np.arange(ref.shape[0]), req.completion_token_ids]
        worst = max(worst, float(np.abs(res.token_logprobs - ref_tok).max()))
    print(
        f"bfloat16 weights vs float32: max {worst:.3g}, mean {np.mean(means):.3g}; plain bf16 max {worst_plain:.3g}"
    )
    assert worst < 0.5 and np.mean(means) < 0.05
    assert worst <= 1.5 * worst_plain + 0.05


def test_bad_engine_arguments(tiny_teacher):
    with pytest.raises(ValueError, match="dtype"):
        load_engine(str(tiny_teacher), dtype="float64")
    with pytest.raises(ValueError, match="backend"):
        load_engine(str(tiny_teacher), backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            load_engine(str(tiny_teacher), device="cuda")
