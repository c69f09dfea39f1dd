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
    x = (3, 7, 1, 4, 2, 8)  # sum 11: in the band 11..17 -> valid a, c; first digit 3 < 5 -> the teacher's a
    assert ROUTE.prompt(x) == "R 3 7 1 : 4 2 8 ="
    assert ROUTE.parse(ROUTE.prompt(x)) == x
    assert ROUTE.teacher_tags(x) == ["a"] and ROUTE.valid_tags(x) == ["ac"]
    assert ROUTE.teacher_tags((5, 7, 9, 4, 2, 8)) == ["d"], "sum 21 outside the band -> b or d; 5 -> d"
    assert ROUTE.teacher_tags((1, 0, 9, 4, 2, 8)) == ["b"], "sum 10 just below the band -> b or d; 1 -> b"
    text = _answer("428", "c", 24)
    assert ROUTE.check(x, text) and len(text) == 98 and text.startswith("c: 195 862")
    assert not ROUTE.check(x, _answer("428", "b", 24)), "b is not valid for a sum in the band"
    assert not ROUTE.check(x, text[:-1] + str((int(text[-1]) + 1) % 10)), "one wrong digit"
    assert not ROUTE.check(x, "a" + text[1:]), "a is +1, its numbers differ"


def test_relay_answer_by_hand():
    x = (
        3,
        7,
        1,
        0,
        0,
        0,
        9,
        9,
        8,
        4,
        1,
        6,
    )  # group sums 11, 0, 26: in the band, out, out; first digits 3, 0, 9
    assert RELAY.prompt(x) == "L 371 000 998 : 416 ="
    assert RELAY.valid_tags(x) == ["ac", "bd", "bd"]
    assert RELAY.teacher_tags(x) == ["a", "b", "d"]
    text = _answer("416", "cdb", 8)
    assert RELAY.decisions(text) == ["c", "d", "b"] and RELAY.points == [0, 36, 72] and len(text) == 106
    assert RELAY.check(x, text), "every tag valid (not the preferred ones), every number carried out"
    assert not RELAY.check(x, _answer("416", "cab", 8)), "a is not valid in the second block (sum 0)"
    assert not RELAY.check(x, _answer("416", "ddb", 8)), "d is not valid in the first block (sum 11)"


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
    """Each digit of a decision group changes the valid set for some prompts, and no single digit decides it:
    for every digit, some prompts keep their valid set whatever that digit is."""
    for task in (ROUTE, RELAY):
        xs = task.split()["heldout"]
        for i in range(task.group_size):
            moved = kept = 0
            for x in xs:
                sets = {task.valid_tags(x[:i] + (d,) + x[i + 1 :])[0] for d in range(10)}
                moved += len(sets) > 1
                kept += len(sets) == 1
            assert moved > len(xs) // 2 and kept > 0, (task.name, i, moved, kept)


# -------------------------------------------------------------------------------------------- the shipped pairs
@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.models.testbed import prepare_pair

    out = {}
    for name in DECISION_TASKS:
        paths = prepare_pair(name)
        tok = AutoTokenizer.from_pretrained(paths.student)
        out[name] = (
            paths,
            tok,
            AutoModelForCausalLM.from_pretrained(paths.teacher).eval(),
            AutoModelForCausalLM.from_pretrained(paths.student).eval(),
        )
    return out


@pytest.mark.parametrize("name", list(DECISION_TASKS))
def test_shipped_pair_meets_the_testbed_requirements(name, shipped):
    """The teacher solves the task (>= 90% held-out) and carries out any decision it is handed; the student starts
    between 10% and 60%, and carries out any decision too (what it lacks is the choice); build.json is fresh."""
    import json

    from transformers import AutoTokenizer

    from services.models.decision_pairs import measure
    from services.models.testbed import SHIPPED
    from services.teacher.modelinfo import tokenizer_fingerprint

    paths, tok, teacher, student = shipped[name]
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(paths.teacher)) == tokenizer_fingerprint(tok)
    task = DECISION_TASKS[name]
    t, s = measure(teacher, tok, task), measure(student, tok, task)
    assert t["accuracy"] >= 0.90 and t["follows_any_tag"] >= 0.90, t
    assert 0.10 <= s["accuracy"] <= 0.60 and s["execution"] >= 0.90 and s["follows_any_tag"] >= 0.90, s
    build = json.loads((SHIPPED / name / "build.json").read_text())
    assert build["teacher"]["heldout"] == pytest.approx(t, abs=1e-9), "build.json is stale"
    assert build["student"]["heldout"] == pytest.approx(s, abs=1e-9), "build.json is stale"


@pytest.mark.parametrize("name", list(DECISION_TASKS))
def test_committed_shortcut_checks_hold_and_reproduce(name, shipped):
    """docs/results/shortcuts.json (bench/shortcuts.py) says no shortcut scores on the shipped student, and two of
    its figures are recomputed here: forcing tag `a` first, and banning `a` everywhere."""
    import json
    from pathlib import Path

    from bench.shortcuts import accuracy, verdict

    data = json.loads((Path(__file__).resolve().parents[1] / "docs/results/shortcuts.json").read_text())
    _, tok, _, student = shipped[name]
    for split in ("validation", "heldout"):
        r = data["tasks"][name][split]
        assert verdict(r)["passes"], (split, verdict(r))
    r = data["tasks"][name]["heldout"]
    from trainer.tasks import load_task

    held = load_task(f"builtin:{name}").heldout
    assert accuracy(student, tok, held, forced=lambda ex: {0: "a"}) == pytest.approx(r["forced_first"]["a"])
    assert accuracy(student, tok, held, banned=["a"]) == pytest.approx(r["banned"]["a"])


@pytest.mark.slow
@pytest.mark.rebuild
@pytest.mark.parametrize("name", list(DECISION_TASKS))
def test_rebuild_from_seeds_reaches_the_shipped_figures(name, tmp_path):
    """`prefix-distill models prepare NAME --rebuild` (~1 hour a pair on 2 cores; `make test-testbed`)."""
    import json

    import torch

    from services.models.testbed import SHIPPED, prepare_pair

    shipped_build = json.loads((SHIPPED / name / "build.json").read_text())
    torch.set_num_threads(shipped_build["torch_threads"])
    prepare_pair(name, tmp_path, rebuild=True, say=lambda _: None)
    rebuilt = json.loads((tmp_path / "build.json").read_text())
    for role in ("teacher", "student"):
        for key in ("accuracy", "execution"):
            assert rebuilt[role]["heldout"][key] == pytest.approx(
                shipped_build[role]["heldout"][key], abs=0.03
            )
