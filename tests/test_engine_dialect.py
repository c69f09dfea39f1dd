"""What the vLLM dialect asks of the engine, in process on a tiny model, against a plain transformers forward:
token ranks, a drawn last token, kept whole sequences reused as prompts; and the prefix memory's rules."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from dialect_ref import next_row, rank_of, reference_rows

from services.teacher.dialect.prefixes import BLOCK, BlockIndex, PrefixResults, block_hashes
from services.teacher.engine import load_engine
from services.teacher.errors import InvalidRequest
from services.teacher.types import ScoreRequest, ScoreResult


@pytest.fixture(scope="module")
def engine(tiny_teacher):
    return load_engine(str(tiny_teacher))


def seq(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 512, n).tolist()


def test_ranks_and_drawn_tokens(engine, tiny_teacher):
    ids = seq(0, 20)
    rows = reference_rows(tiny_teacher, ids)
    (res,) = engine.score([ScoreRequest(ids[:1], ids[1:], token_ranks=True, top_k=3)])
    assert res.token_ranks.tolist() == [rank_of(rows[i], ids[i]) for i in range(1, 20)]
    greedy = engine.score_one(ScoreRequest(ids, [0], sample_last=True, greedy=True, token_ranks=True))
    row = next_row(tiny_teacher, ids)
    assert greedy.sampled_token_id == int(np.argmax(row)) and greedy.token_ranks.tolist() == [1]
    assert abs(greedy.token_logprobs[0] - row.max()) < 1e-5
    draws = {
        engine.score_one(ScoreRequest(ids, [0], sample_last=True, seed=7)).sampled_token_id for _ in range(3)
    }
    assert len(draws) == 1  # seeded
    free = [engine.score_one(ScoreRequest(ids, [0], sample_last=True, temperature=5.0)) for _ in range(8)]
    assert len({r.sampled_token_id for r in free}) > 1  # a draw, not the argmax
    for r in free:
        assert abs(r.token_logprobs[0] - next_row(tiny_teacher, ids, 5.0)[r.sampled_token_id]) < 1e-5


@pytest.mark.parametrize("same_batch", [True, False])
def test_kept_sequence_is_reused_exactly(engine, tiny_teacher, same_batch):
    head = seq(1, 32)
    tails = [seq(2 + i, 10) for i in range(3)]
    keep = ScoreRequest(head[:1], head[1:], keep_sequence=True, top_k=2)
    samples = [ScoreRequest(head, t, top_k=2) for t in tails]
    results = engine.score([keep, *samples]) if same_batch else engine.score([keep]) + engine.score(samples)
    assert [r.prompt_tokens_reused for r in results[1:]] == [32, 32, 32]
    for r, t in zip(results[1:], tails, strict=True):
        rows = reference_rows(tiny_teacher, head + t)
        np.testing.assert_allclose(r.token_logprobs, [rows[32 + j][x] for j, x in enumerate(t)], atol=1e-5)


def test_keep_with_a_placeholder_is_refused():
    with pytest.raises(InvalidRequest, match="keep_sequence"):
        ScoreRequest([1], [2, 3], keep_sequence=True, sample_last=True)
    with pytest.raises(InvalidRequest, match="seed"):
        ScoreRequest([1], [2], sample_last=True, seed=-1)


def test_block_index_shares_block_aligned_prefixes():
    a, b = seq(5, 40), seq(6, 40)
    c = a[:35] + seq(7, 10)  # shares 35 tokens with a: two full blocks
    index = BlockIndex()
    for s in (a, b):
        index.add(block_hashes(s))
    assert index.shared_length(block_hashes(a), len(a) - 1) == 0  # seen once: nothing shared yet
    index.add(block_hashes(c))
    assert index.shared_length(block_hashes(c), len(c) - 1) == 2 * BLOCK
    assert index.shared_length(block_hashes(a), 20) == BLOCK  # bounded by the limit
    assert index.shared_length(block_hashes(b), len(b) - 1) == 0


def test_prefix_results_are_shared_and_failures_forgotten():
    async def go():
        store, calls = PrefixResults(), []

        async def ok():
            calls.append(1)
            return ScoreResult("x", np.zeros(1, np.float32))

        async def bad():
            calls.append(1)
            raise InvalidRequest("no", "x")

        a, b = store.get(("k",), ok), store.get(("k",), ok)
        assert a is b and (await a).request_id == "x" and len(calls) == 1
        with pytest.raises(InvalidRequest):
            await store.get(("f",), bad)
        await store.get(("f",), ok)  # tried again after the failure
        return len(calls)

    assert asyncio.run(go()) == 3
