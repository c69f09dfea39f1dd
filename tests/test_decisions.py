"""The decision tasks (route, relay): rules checked against an independent re-derivation, splits that are
compositional and balanced, gold answers without the teacher's preference, and the evaluation's forcing."""

from __future__ import annotations

import random

import pytest

from services.models.decisions import DECISION_TASKS, RELAY, ROUTE


def _digits_after(start: str, k: int, count: int) -> list[str]:
    """Written out independently: each digit moves by k modulo 10, `count` times."""
    out, cur = [], [int(c) for c in start]
    for _ in range(count):
        cur = [(d + k) % 10 for d in cur]
        out.append("".join(map(str, cur)))
    return out


def _answer(start: str, tags: str, count: int) -> str:
    steps = {"a": 1, "b": 3, "c": 7, "d": 9}
    blocks = []
    for tag in tags:
        nums = _digits_after(start, steps[tag], count)
        blocks.append(f"{tag}:" + "".join(" " + n for n in nums))
        start = nums[-1]
    return " |".join(blocks)


def test_route_answer_by_hand():
    x = (3, 7, 1, 4, 2, 8)  # sum 11: odd -> valid b, d (indices 1, 3); 11 mod 4 = 3 -> the teacher prefers d
    assert ROUTE.prompt(x) == "R 3 7 1 : 4 2 8 ="
    assert ROUTE.parse(ROUTE.prompt(x)) == x
    assert ROUTE.teacher_tags(x) == ["d"] and ROUTE.valid_tags(x) == ["bd"]
    text = _answer("428", "b", 24)
    assert ROUTE.check(x, text) and len(text) == 98 and text.startswith("b: 751 084")
    assert not ROUTE.check(x, _answer("428", "a", 24)), "a is not valid for an odd digit sum"
    assert not ROUTE.check(x, text[:-1] + str((int(text[-1]) + 1) % 10)), "one wrong digit"
    assert not ROUTE.check(x, "d" + text[1:]), "d is +9, its numbers differ"


def test_relay_answer_by_hand():
    x = (3, 7, 1, 0, 0, 0, 9, 9, 8, 4, 1, 6)  # group sums 11, 0, 26: parities 1, 0, 0; mod 4: 3, 0, 2
    assert RELAY.prompt(x) == "L 371 000 998 : 416 ="
    assert RELAY.valid_tags(x) == ["bd", "ac", "ac"]
    assert RELAY.teacher_tags(x) == ["d", "a", "c"]
    text = _answer("416", "bca", 8)
    assert RELAY.decisions(text) == ["b", "c", "a"] and RELAY.points == [0, 36, 72] and len(text) == 106
    assert RELAY.check(x, text), "every tag valid (not the preferred ones), every number carried out"
    assert not RELAY.check(x, _answer("416", "bba", 8)), "b is not valid in the second block (even sum)"
    assert not RELAY.check(x, _answer("416", "cca", 8)), "c is not valid in the first block (odd sum)"


@pytest.mark.parametrize("task", list(DECISION_TASKS.values()), ids=lambda t: t.name)
def test_splits_are_fixed_disjoint_compositional_and_balanced(task):
    splits = task.split()
    assert splits == task.split(), "drawn once, the same every time"
    sets = {k: set(v) for k, v in splits.items()}
    assert len(splits["heldout"]) >= 200 and len(splits["validation"]) >= 200
    assert not (
        sets["train"] & sets["heldout"]
        or sets["train"] & sets["validation"]
        or sets["validation"] & sets["heldout"]
    )
    pairs = {k: {(x[0], x[1]) for x in v} for k, v in splits.items()}
    assert not pairs["train"] & pairs["heldout"], "held-out digit pairs never occur in training"
    assert not pairs["train"] & pairs["validation"] and not pairs["validation"] & pairs["heldout"]
    for key in ("validation", "heldout"):
        xs = splits[key]
        for j in range(task.blocks):
            for option in task.options:
                wrong = sum(option not in task.valid_tags(x)[j] for x in xs) / len(xs)
                assert wrong >= 1 / 3 - 1e-9, (key, j, option, wrong)


@pytest.mark.parametrize("task", list(DECISION_TASKS.values()), ids=lambda t: t.name)
def test_gold_is_valid_and_carries_no_preference(task):
    xs = task.split()["train"][:600]
    golds = [task.gold(x) for x in xs]
    assert all(task.check(x, g) for x, g in zip(xs, golds, strict=True))
    agree = sum(
        a == b
        for x, g in zip(xs, golds, strict=True)
        for a, b in zip(task.decisions(g), task.teacher_tags(x), strict=True)
    ) / (len(xs) * task.blocks)
    assert 0.4 < agree < 0.6, (
        f"gold draws among 2 valid tags uniformly: {agree:.2f} agreement with the teacher"
    )
    rng = random.Random(0)
    samples = [task.teacher_sample(x, rng) for x in xs]
    pref = sum(
        a == b
        for x, s in zip(xs, samples, strict=True)
        for a, b in zip(task.decisions(s), task.teacher_tags(x), strict=True)
    ) / (len(xs) * task.blocks)
    assert 0.85 < pref < 0.95 and all(task.check(x, s) for x, s in zip(xs, samples, strict=True))
    prompt_len = len(task.prompt(xs[0]))
    assert prompt_len >= 16 and min(len(g) for g in golds) >= 96


def test_decisions_read_the_prompt_not_one_character():
    """Changing any one digit of a decision group changes the valid set for some prompt, and the preferred tag
    depends on the whole sum, not on a single position."""
    for task in (ROUTE, RELAY):
        x = task.split()["heldout"][0]
        for i in range(task.group_size):
            y = list(x)
            y[i] = (y[i] + 1) % 10
            assert task.valid_tags(tuple(y))[0] != task.valid_tags(x)[0]
