"""Answers scored once and again, on the engine the compose stack runs (the route teacher, float32, the worker's
default settings): again means in batches with sequences of other lengths, over the prompt the first call cached.
They differ at float32 rounding level, inside `tolerance.batch_tolerance` (the derivation is in tests/tolerance.py);
with the prompt cache off, a batch gives the answers alone bit for bit. Prints the largest difference, where it
fell and the constant it needed, against the fixed 1e-4 tests/test_deploy_engine.py used before."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from test_deploy_engine import _bodies
from tolerance import C_OBSERVED, C, batch_ratio, batch_tolerance

from services.teacher.engine import load_engine
from services.teacher.types import ScoreRequest

ROUNDS = int(os.environ.get("BATCH_TOLERANCE_ROUNDS", "3"))
ROUTE = Path(__file__).resolve().parent.parent / "services" / "models" / "pairs" / "route" / "teacher"


def test_batch_tolerance_grows_with_the_square_root_of_length():
    assert batch_tolerance(0) == batch_tolerance(1) < batch_tolerance(16)
    assert batch_tolerance(64) == pytest.approx(2 * batch_tolerance(16))
    assert batch_ratio(batch_tolerance(190), 190) == pytest.approx(C)


@pytest.mark.skipif(not ROUTE.is_dir(), reason="the shipped route pair is missing")
def test_answers_in_a_batch_stay_inside_the_tolerance():
    engine = load_engine(str(ROUTE))
    tok = engine.tokenizer
    bodies = _bodies(8)

    def request(body: dict, cut: int | None = None) -> ScoreRequest:
        p = tok(body["prompt"], add_special_tokens=False).input_ids
        c = tok(body["completion"], add_special_tokens=False).input_ids[:cut]
        return ScoreRequest(p, c, top_k=5)

    alone = [engine.score([request(b)])[0] for b in bodies]
    rng = random.Random(0)
    worst = (0.0, 0, 0.0)  # (diff, n, ratio)
    top_ratio = 0.0
    for _ in range(ROUNDS):
        picked = rng.sample(range(len(bodies)), 4)
        cuts = [rng.randrange(5, 200) for _ in picked]  # companions of other lengths
        batch = [request(bodies[j]) for j in picked] + [
            request(bodies[j], c) for j, c in zip(picked, cuts, strict=True)
        ]
        for j, res in zip(picked, engine.score(batch)[: len(picked)], strict=True):
            a = alone[j]
            assert np.array_equal(a.top_k_ids, res.top_k_ids)
            P = len(request(bodies[j]).prompt_token_ids)
            diff_TK = np.abs(a.top_k_logprobs - res.top_k_logprobs)  # (T, k)
            for t in range(len(a.token_logprobs)):
                n = P + t
                pairs = [(abs(a.token_logprobs[t] - res.token_logprobs[t]), a.token_logprobs[t])]
                pairs += list(zip(diff_TK[t], a.top_k_logprobs[t], strict=True))
                for d, lp in pairs:
                    assert d <= batch_tolerance(n), (n, d, lp)
                    r = batch_ratio(float(d), n)
                    top_ratio = max(top_ratio, r)
                    if d > worst[0]:
                        worst = (float(d), n, r)
    plain = load_engine(str(ROUTE), prompt_cache_mb=0)  # no reuse: padding alone changes nothing
    first = plain.score([request(bodies[0])])[0]
    (batched, *_) = plain.score([request(bodies[0]), request(bodies[1]), request(bodies[2], 20)])
    assert np.array_equal(first.top_k_logprobs, batched.top_k_logprobs)
    assert np.array_equal(first.token_logprobs, batched.token_logprobs)
    print(
        f"\n[batch] largest |once - again| {worst[0]:.3g} at position {worst[1]} (ratio {worst[2]:.2f}); "
        f"largest ratio {top_ratio:.2f} (C_OBSERVED {C_OBSERVED}, C {C}); the old fixed tolerance 1e-4 "
        f"{'exceeded' if worst[0] > 1e-4 else 'not exceeded in this run'}"
    )
    assert top_ratio <= C_OBSERVED, "a larger constant than measured before: update tests/tolerance.py"
