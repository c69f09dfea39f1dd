"""The testbed: rule tasks checked against an independent re-derivation, the character tokenizer, and the
shipped pairs (teacher >= 90% held-out, student clearly worse, one tokenizer); the rebuild from seeds is slow.
"""

from __future__ import annotations

import json
import random

import pytest

from services.models import rules
from services.models.testbed import (
    PAIRS,
    SHIPPED,
    build_tokenizer,
    heldout_accuracy,
    pair_names,
    prepare_pair,
)


def _numbers_after(n: int, k: int, count: int) -> list[int]:
    return [(n + k * i) % 1000 for i in range(1, count + 1)]


def test_plan_answers_are_checked_by_the_rule():
    n = 300
    # valid: n + 24 k <= 999  ->  k <= 29.1: steps 3, 11, 19, 27 (a-d); 33 and 39 (e, f) wrap
    assert rules.plan_valid(n) == ["a", "b", "c", "d"]
    for tag, k in (("a", 3), ("d", 27)):
        text = f"{tag}:" + "".join(f" {x:03d}" for x in _numbers_after(n, k, 24))
        assert rules.plan_check(n, text)
    wrapped = "e:" + "".join(f" {x:03d}" for x in _numbers_after(n, 33, 24))
    assert not rules.plan_check(n, wrapped), "a tag that wraps past 999 is not a valid plan"
    good = "d:" + "".join(f" {x:03d}" for x in _numbers_after(n, 27, 24))
    assert not rules.plan_check(n, good[:-1] + "0"), "one wrong digit"
    assert not rules.plan_check(n, good[:-4]), "a number short"


def test_chain_answers_are_checked_block_by_block():
    n = 537  # last digit 7 -> tags a or b
    assert rules.CHAIN_TABLE[7] == "ab"
    x, blocks = n, []
    for _ in range(7):
        tag = rules.CHAIN_TABLE[x % 10][1]  # always the non-preferred tag: still valid
        xs = _numbers_after(x, rules.STEPS[tag], 3)
        blocks.append(f"{tag}:" + "".join(f" {v:03d}" for v in xs))
        x = xs[-1]
    text = " |".join(blocks)
    assert rules.chain_check(n, text)
    assert not rules.chain_check(n, "c" + text[1:]), "c is not allowed after a 7"
    assert not rules.chain_check(n, " |".join(blocks[:6])), "a block short"


@pytest.mark.parametrize("task", list(rules.RULE_TASKS.values()), ids=lambda t: t.name)
def test_splits_are_fixed_disjoint_and_gold_answers_are_valid(task):
    train, heldout = task.split()
    assert len(heldout) >= 200 and not set(train) & set(heldout)
    assert task.split() == (train, heldout)
    rng = random.Random(0)
    for n in rng.sample(heldout, 20):
        gold = task.gold(n)
        assert task.check(n, gold) and task.is_correct(task.prompt(n), gold)
        assert len(gold) >= 96 > 4 * len(task.prompt(n)), "answers several times longer than the prompt"


def test_character_tokenizer_round_trips():
    tok = build_tokenizer()
    text = rules.PLAN.prompt(537) + rules.plan_answer(537, "b")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


@pytest.mark.parametrize("name", list(PAIRS))
def test_shipped_pair_teacher_solves_the_task_and_the_student_lags(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.teacher.modelinfo import tokenizer_fingerprint

    paths = prepare_pair(name)
    build = json.loads((SHIPPED / name / "build.json").read_text())
    task = rules.RULE_TASKS[name]
    tok_t, tok_s = AutoTokenizer.from_pretrained(paths.teacher), AutoTokenizer.from_pretrained(paths.student)
    assert tokenizer_fingerprint(tok_t) == tokenizer_fingerprint(tok_s)
    teacher = AutoModelForCausalLM.from_pretrained(paths.teacher).eval()
    student = AutoModelForCausalLM.from_pretrained(paths.student).eval()
    t_acc, s_acc = heldout_accuracy(teacher, tok_t, task), heldout_accuracy(student, tok_s, task)
    assert t_acc >= 0.9, t_acc
    assert 0.10 <= s_acc <= 0.60, s_acc
    assert t_acc == pytest.approx(build["teacher"]["heldout_accuracy"], abs=1e-9), "build.json is stale"
    assert s_acc == pytest.approx(build["student"]["heldout_accuracy"], abs=1e-9), "build.json is stale"


@pytest.mark.parametrize("name", pair_names())
def test_models_prepare_copies_every_shipped_pair(name, tmp_path):
    """`prefix-distill models prepare NAME --out DIR` (the compose `models` service's command) accepts every pair
    prepare_pair knows, the decision tasks' included (it once accepted only PAIRS: `prepare route` failed)."""
    from typer.testing import CliRunner

    from services.models.commands import app

    result = CliRunner().invoke(app, ["prepare", name, "--out", str(tmp_path / name)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / name / "teacher" / "config.json").is_file()
    assert (tmp_path / name / "student" / "config.json").is_file()
    assert name in CliRunner().invoke(app, ["prepare", "--help"], terminal_width=200).output


@pytest.mark.slow
@pytest.mark.rebuild
@pytest.mark.parametrize("name", list(PAIRS))
def test_rebuild_from_seeds_reaches_the_shipped_accuracy(name, tmp_path):
    """~30 minutes a pair on 2 cores (`make test-testbed`)."""
    import torch

    shipped = json.loads((SHIPPED / name / "build.json").read_text())
    torch.set_num_threads(shipped["torch_threads"])
    prepare_pair(name, tmp_path, rebuild=True, say=lambda _: None)
    rebuilt = json.loads((tmp_path / "build.json").read_text())
    for role in ("teacher", "student"):
        assert rebuilt[role]["heldout_accuracy"] == pytest.approx(shipped[role]["heldout_accuracy"], abs=0.03)
