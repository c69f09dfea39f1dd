"""engine/cpu_topk.py against `torch.topk`, and the engine's top-k on a vocabulary wide enough to use blocks
against a plain transformers forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.teacher.engine import cpu_topk, load_engine
from services.teacher.types import ScoreRequest


def assert_same_topk(x_NV: torch.Tensor, k: int) -> None:
    values, ids = cpu_topk.topk(x_NV, k)
    ref_values, ref_ids = x_NV.topk(k, dim=-1, sorted=True)
    assert values.shape == ids.shape == (x_NV.shape[0], k) and ids.dtype == torch.int64
    assert torch.equal(values, ref_values)  # the same values, bit for bit (NaN-free inputs)
    assert torch.equal(x_NV.gather(1, ids), values)  # each id points at its value
    distinct = [len(set(row.tolist())) == len(row) for row in x_NV]  # rows without ties: the same ids
    for n, clear in enumerate(distinct):
        if clear:
            assert torch.equal(ids[n], ref_ids[n])


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    vocab=st.integers(64 * 8, 64 * 60 + 63),  # tails of 0..63 values that fill no block
    k=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_matches_torch_topk(rows, vocab, k, seed, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g)
    if ties:  # few distinct values, and -inf as a masked vocabulary would have
        x = torch.round(x * 2) / 2
        x[:, ::7] = float("-inf")
    assert_same_topk(x, k)


def test_the_largest_values_in_one_block_or_in_the_tail():
    V = 64 * 200 + 5
    x = torch.randn(3, V)
    x[0, 128:148] += 100  # all of the top 20 in one block
    x[1, -5:] += 100  # the tail outranks every block
    x[2, ::64] += 100  # one of the top values in each of many blocks
    assert_same_topk(x, 20)


def test_narrow_rows_and_large_k_fall_back_to_torch():
    x = torch.randn(4, 300)  # k x BLOCK > an eighth of the row
    assert_same_topk(x, 20)
    assert_same_topk(torch.randn(2, 64 * 8 * 5), 6)  # blocks only just not worth it


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory):
    """A tiny Llama with a 12,345-row vocabulary: top-20 of it goes through blocks (plus a 57-value tail)."""
    from services.models.tiny import build_tiny

    return build_tiny(
        tmp_path_factory.mktemp("wide"), layers=2, hidden=64, seed=3, init_std=0.2, model_vocab=12345
    )


def test_engine_top20_on_a_wide_vocabulary_matches_a_plain_forward(wide_teacher):
    from transformers import AutoModelForCausalLM

    assert 20 * cpu_topk.BLOCK <= 12345 * cpu_topk.MAX_CANDIDATE_SHARE  # the blocked path is the one tested
    engine = load_engine(str(wide_teacher), prompt_cache_mb=0)
    model = AutoModelForCausalLM.from_pretrained(wide_teacher, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    reqs = [
        ScoreRequest(
            rng.integers(0, 500, 9 + i), rng.integers(0, 500, 5 + 3 * i), request_id=f"r{i}", top_k=20
        )
        for i in range(4)
    ]
    for req, res in zip(reqs, engine.score(reqs), strict=True):
        ids = torch.tensor([list(req.prompt_token_ids) + list(req.completion_token_ids)])
        with torch.no_grad():
            logits_SV = model(input_ids=ids).logits[0].float()
        P, T = req.prompt_token_ids.size, req.completion_token_ids.size
        ref_TV = torch.log_softmax(logits_SV[P - 1 : P + T - 1], dim=-1)
        ref_values, ref_ids = ref_TV.topk(21, dim=-1)  # the 21st tells whether the 20th is tied
        np.testing.assert_allclose(res.top_k_logprobs, ref_values[:, :20].numpy(), atol=1e-4, rtol=0)
        gaps_Tk = (ref_values[:, :-1] - ref_values[:, 1:]).numpy() > 1e-3  # (T, 20): clear of the next value
        clear_Tk = gaps_Tk.copy()
        clear_Tk[:, 1:] &= gaps_Tk[:, :-1]  # ... and of the previous one: a unique id
        assert clear_Tk.mean() > 0.5
        assert np.array_equal(res.top_k_ids[clear_Tk], ref_ids[:, :20].numpy()[clear_Tk])
