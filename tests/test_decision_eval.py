"""What the evaluation measures on the decision tasks: forced and banned tokens in generation, agreement with the
teacher's greedy decisions and execution, each against an independent computation (transformers' own greedy
generate with a logits processor; a teacher identical to the student, whose argmax is the student's choice)."""

from __future__ import annotations

import copy

import pytest
import torch

from services.models.decision_pairs import build_tokenizer, greedy_answers
from services.models.decisions import RELAY, ROUTE
from services.models.testbed import Recipe, new_model
from trainer.sampling import generate
from trainer.tasks import load_task, render


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    """A random 2-layer Llama over the decision tasks' character tokenizer, saved as a folder."""
    tok = build_tokenizer()
    model = new_model(Recipe(2, 32, 2, 1, seed=3), tok).eval()
    path = tmp_path_factory.mktemp("char") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def perturbed(model, sigma: float = 0.02):
    """The student with seeded noise on every weight: a teacher that agrees with it at some relay decision points
    and not at others (4 of the first 6 held-out prompts' 18), so that an agreement count is tested by more
    than 0 == 0."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in other.parameters():
            w.add_(torch.randn(w.shape, generator=g) * sigma)
    return other


def test_forced_and_banned_tokens_in_generation_match_transformers_generate(char_model):
    _, model, tok = char_model
    examples = load_task("builtin:relay").heldout[:6]
    ids = [render(ex, tok) for ex in examples]
    enc = tok.convert_tokens_to_ids
    forced = [{t: enc(c) for t, c in ex.forced_decisions().items()} for ex in examples]
    ro = generate(
        model, ids, 120, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0.0, forced=forced
    )
    ours = [tok.decode(ro.completion(i), skip_special_tokens=True) for i in range(len(examples))]
    theirs = greedy_answers(
        model, tok, RELAY, [RELAY.parse(ex.prompt) for ex in examples],
        forced=lambda x: dict(zip(RELAY.points, RELAY.teacher_tags(x), strict=True)),
    )  # fmt: skip
    assert ours == theirs, "the same greedy answers, 120 tokens each"
    for i, ex in enumerate(examples):
        comp = ro.completion(i)
        for p, tag in ex.forced_decisions().items():
            assert len(comp) <= p or comp[p] == enc(tag)
    banned = [enc(c) for c in "0123456789"]
    ro = generate(model, ids, 40, eos_id=None, pad_id=tok.pad_token_id, temperature=1.0, banned=banned)
    assert not set(ro.ids_BT[ro.mask_BT.bool()].tolist()) & set(banned)


def test_agreement_is_one_when_the_teacher_is_the_student_and_execution_matches_forced_generate(char_model):
    from services.teacher.client import ClientOptions
    from trainer.evaluate import evaluate
    from trainer.teacher_io import TeacherIO

    path, model, tok = char_model
    examples = load_task("builtin:route").heldout[:8]
    ids = [render(ex, tok) for ex in examples]
    teacher = TeacherIO(f"inprocess:{path}", ClientOptions())
    try:
        result = evaluate(
            model, tok, examples, ids, teacher, max_new_tokens=112, batch_size=4, head_tokens=16, full_rows=True,
            top_k=8, vocab=len(tok), job_id="t",
        )  # fmt: skip
    finally:
        teacher.close()
    m = result.metrics
    assert m["eval/agreement"] == 1.0, (
        "the teacher's argmax after the student's own prefix is the student's choice"
    )
    forced = greedy_answers(model, tok, ROUTE, [ROUTE.parse(ex.prompt) for ex in examples],
                            forced=lambda x: {0: ROUTE.teacher_tags(x)[0]})  # fmt: skip
    expected = sum(ROUTE.check(ROUTE.parse(ex.prompt), t) for ex, t in zip(examples, forced, strict=True)) / 8
    assert m["eval/execution"] == expected
    assert abs(m["eval/kl"]) < 1e-5


def test_agreement_counts_decision_points_against_a_different_teacher(char_model, tmp_path):
    """A teacher that differs from the student: agreement is the share of the 3 relay decision points where the
    student's greedy token equals the teacher's argmax after the same prefix, computed here by plain forwards."""
    from services.teacher.client import ClientOptions
    from trainer.evaluate import evaluate
    from trainer.teacher_io import TeacherIO

    _, model, tok = char_model
    other = perturbed(model)
    other.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    examples = load_task("builtin:relay").heldout[:6]
    ids = [render(ex, tok) for ex in examples]
    teacher = TeacherIO(f"inprocess:{tmp_path / 't'}", ClientOptions())
    try:
        m = evaluate(model, tok, examples, ids, teacher, max_new_tokens=112, batch_size=3, head_tokens=16,
                     full_rows=True, top_k=8, vocab=len(tok), job_id="t", execution=False).metrics  # fmt: skip
    finally:
        teacher.close()
    ro = generate(model, ids, 112, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0.0)
    agree = 0
    for i, p_ids in enumerate(ids):
        comp = ro.completion(i)
        with torch.no_grad():
            logits = other(input_ids=torch.tensor([p_ids + comp])).logits[0]
        for p in RELAY.points:
            agree += int(p < len(comp) and int(logits[len(p_ids) - 1 + p].argmax()) == comp[p])
    assert 0 < agree < len(RELAY.points) * len(examples), (
        "a teacher that always or never agrees tests no count"
    )
    assert m["eval/agreement"] == agree / (len(RELAY.points) * len(examples))
    assert "eval/execution" not in m


def test_light_evaluation_measures_the_same_accuracy_and_agreement_without_kl(char_model, tmp_path):
    """The dense evaluations of a run (eval.light): the teacher's top-1 up to the last decision point gives the
    agreement that its full rows give; no KL and no execution are reported."""
    from services.teacher.client import ClientOptions
    from trainer.evaluate import evaluate
    from trainer.teacher_io import TeacherIO

    _, model, tok = char_model
    other = perturbed(model)
    other.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    examples = load_task("builtin:relay").heldout[:6]
    ids = [render(ex, tok) for ex in examples]
    teacher = TeacherIO(f"inprocess:{tmp_path / 't'}", ClientOptions())
    kw = dict(
        max_new_tokens=112, batch_size=3, head_tokens=16, full_rows=True, top_k=8, vocab=len(tok), job_id="t"
    )
    try:
        full = evaluate(model, tok, examples, ids, teacher, **kw).metrics
        light = evaluate(model, tok, examples, ids, teacher, light=True, **kw).metrics
    finally:
        teacher.close()
    assert 0 < full["eval/agreement"] < 1, full
    assert (
        light["eval/agreement"] == full["eval/agreement"] and light["eval/accuracy"] == full["eval/accuracy"]
    )
    assert not any(k.startswith("eval/kl") for k in light) and "eval/execution" not in light
    assert "eval/execution" in full and "eval/kl" in full
