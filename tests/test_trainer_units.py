"""Trainer parts without a teacher: config parsing, schedules, FLOP formula (against torch's FlopCounterMode on
the real model), KV-cache sampling (against full forward passes and transformers' own greedy generate), tasks."""

from __future__ import annotations

import re

import pytest
import torch

from trainer import flops as F
from trainer.config import ConfigError, PrefixConfig, describe, load_config
from trainer.schedule import learning_rate, prefix_length
from trainer.tasks import arith_task, extract_answer, is_correct, load_task, render

REQ = ["student=s", "teacher=t"]


# ---------------------------------------------------------------------------------------------------- config
def test_config_yaml_nesting_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "student: /m/s\nteacher: grpc://h:1\nsteps: 7\nlr: 3.0e-4\n"
        "prefix: {schedule: linear, start: 4, end: 32}\neval: {every: 2, prompts: 5, max_new_tokens: 40}\n"
    )
    cfg = load_config(path, ["prefix.end=48", "lr=1e-3", "eval.prompts=builtin:arith", "stop_at_eos=false"])
    assert (cfg.steps, cfg.lr, cfg.stop_at_eos) == (7, 1e-3, False)
    assert (cfg.prefix.schedule, cfg.prefix.start, cfg.prefix.end) == ("linear", 4, 48)
    assert (cfg.eval.every, cfg.eval.prompts, cfg.eval.max_new_tokens) == (2, "builtin:arith", 40)
    assert cfg.run_job_id == "run" and cfg.to_dict()["prefix"]["end"] == 48


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["prefix.lenght=3"], "unknown key `prefix.lenght`; valid keys here: prefix.end, prefix.length"),
        (["steps=0"], "`steps` must be >= 1, got 0."),
        (["steps=ten"], "`steps` must be an integer, got 'ten'."),
        (["lr=-1"], "`lr` must be > 0"),
        (["loss=kl"], "`loss` must be one of"),
        (["prefix.schedule=cosine"], "`prefix.schedule` must be one of"),
        (["prefix.length=100"], "`prefix.length` must be in [1, max_new_tokens=64], got 100."),
        (
            ["prefix.schedule=linear", "prefix.start=10", "prefix.end=5"],
            "`prefix.end` must be in [prefix.start=10",
        ),
        (["jsd_beta=1.5"], "`jsd_beta` must be in [0, 1]"),
        (["eval.every=-1"], "`eval.every` must be >= 0"),
        (["prefix=3"], "`prefix` is a section"),
        (["dtype=float8"], "`dtype` must be one of"),
        (["stop_at_eos=maybe"], "`stop_at_eos` must be true or false"),
        (["nokey"], "must look like key=value"),
        (["eval.top_k=0"], "`eval.top_k` must be >= 1, got 0."),
        (["teacher_client.retries=-1"], "`teacher_client.retries` must be >= 0, got -1."),
        (["teacher_client.max_in_flight=0"], "`teacher_client.max_in_flight` must be >= 1, got 0."),
        (
            ["teacher_client.retrys=1"],
            "unknown key `teacher_client.retrys`; valid keys here: teacher_client.",
        ),
        (["rollouts.source=model"], "`rollouts.source` must be one of ['student', 'teacher', 'gold']"),
        (["anchor.l2=-0.1"], "`anchor.l2` must be >= 0, got -0.1."),
        (["anchor.tail_fraction=1.5"], "`anchor.tail_fraction` must be in [0, 1], got 1.5."),
        (["anchor.tail_target=student"], "`anchor.tail_target` must be one of ['reference', 'teacher']"),
        (["anchor.tail_weight=-1"], "`anchor.tail_weight` must be >= 0, got -1.0."),
        (["anchor.tail=1"], "unknown key `anchor.tail`; valid keys here: anchor.l2, anchor.tail_fraction"),
        (
            ["freeze=model.layers"],
            "`freeze` must be a list of non-empty strings, e.g. [a, b], got 'model.layers'.",
        ),
        (
            ["freeze=[model.layers, 3]"],
            "`freeze` must be a list of non-empty strings, e.g. [a, b], got ['model",
        ),
        (["freeze={a: 1}"], "`freeze` must be a list of non-empty strings"),
        (["eval.split=test"], "`eval.split` must be one of heldout, validation, got 'test'."),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, REQ + overrides)
    assert message in str(err.value)


def test_freeze_is_a_list_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "student: s\nteacher: t\nfreeze: [model.embed_tokens, model.layers]\n"
        "rollouts: {source: teacher, model: /m/t}\nanchor: {l2: 0.01, tail_fraction: 0.125}\n"
    )
    cfg = load_config(path)
    assert cfg.freeze == ["model.embed_tokens", "model.layers"]
    assert (cfg.rollouts.source, cfg.rollouts.model) == ("teacher", "/m/t")
    assert (cfg.anchor.l2, cfg.anchor.tail_fraction, cfg.anchor.tail_target) == (0.01, 0.125, "reference")
    assert load_config(path, ["freeze=[model.norm]"]).freeze == ["model.norm"]
    assert load_config(path, ["freeze=[]"]).freeze == [] and load_config(path, ["freeze="]).freeze == []
    assert load_config(None, REQ).freeze == [] and load_config(None, REQ).to_dict()["freeze"] == []
    path.write_text("student: s\nteacher: t\nfreeze:\n  - model.embed_tokens\n  - lm_head\n")
    assert load_config(path).freeze == ["model.embed_tokens", "lm_head"]
    defaults = {k: v for k, v, _ in describe()}
    assert defaults["freeze"] == "[]" and defaults["rollouts.source"] == "'student'"
    assert (defaults["anchor.l2"], defaults["anchor.tail_fraction"], defaults["anchor.tail_weight"]) == (
        "0.0",
        "0.0",
        "1.0",
    )


def test_teacher_client_section_is_the_clients_options_and_its_token_is_never_saved(monkeypatch, tmp_path):
    from services.teacher.client import ClientOptions, TeacherClient
    from trainer.config import config_from_dict
    from trainer.losses import LOSSES

    cfg = load_config(None, REQ + ["teacher_client.timeout_s=5", "teacher_client.token=s3cret"])
    assert cfg.teacher_client == ClientOptions(timeout_s=5.0, token="s3cret")
    # the defaults of the section are the client's own, and every loss of the table is a valid choice
    defaults = {k: v for k, v, _ in describe() if k.startswith("teacher_client.")}
    assert defaults["teacher_client.retries"] == str(ClientOptions().retries)
    assert [load_config(None, REQ + [f"loss={name}"]).loss for name in LOSSES] == list(LOSSES)
    saved = cfg.to_dict()
    assert saved["teacher_client"]["token"] == "" and cfg.teacher_client.token == "s3cret"
    assert config_from_dict(saved).teacher_client.timeout_s == 5.0
    # the token falls back to the environment, and keyword overrides replace single fields
    monkeypatch.setenv("PREFIX_DISTILL_TEACHER_TOKEN", "from-env")
    client = TeacherClient("grpc://h:1", ClientOptions(retries=1), timeout_s=3)
    assert (client.options.retries, client.options.timeout_s) == (1, 3)
    assert client.metadata == (("authorization", "Bearer from-env"),)
    assert TeacherClient("h:1", token="t").metadata == (("authorization", "Bearer t"),)
    with pytest.raises(ValueError, match="`max_in_flight` must be >= 1"):
        TeacherClient("h:1", max_in_flight=0)


def test_config_requires_student_and_teacher_and_every_field_is_documented():
    with pytest.raises(ConfigError, match="`student` is required"):
        load_config(None, ["teacher=t"])
    rows = describe()
    keys = {k for k, _, _ in rows}
    for key in (
        "student",
        "teacher",
        "job_id",
        "prompts",
        "steps",
        "batch_size",
        "samples_per_prompt",
        "lr",
        "max_new_tokens",
        "prefix.schedule",
        "prefix.length",
        "prefix.start",
        "prefix.end",
        "loss",
        "top_k",
        "temperature",
        "eval.every",
        "eval.prompts",
        "eval.max_new_tokens",
        "output_dir",
        "seed",
        "dtype",
    ):
        assert key in keys, key
    assert all(len(h) > 15 for _, _, h in rows)


# ---------------------------------------------------------------------------------------------------- schedules
def test_prefix_schedules():
    total, M = 11, 64
    full = [prefix_length(PrefixConfig(schedule="full"), s, total, M) for s in range(total)]
    const = [prefix_length(PrefixConfig(schedule="constant", length=8), s, total, M) for s in range(total)]
    lin = [prefix_length(PrefixConfig(schedule="linear", start=8, end=58), s, total, M) for s in range(total)]
    step = [
        prefix_length(PrefixConfig(schedule="step", start=8, end=32, stages=4), s, 12, M) for s in range(12)
    ]
    assert full == [64] * total and const == [8] * total
    assert lin == [8, 13, 18, 23, 28, 33, 38, 43, 48, 53, 58]
    assert step == [8, 8, 8, 16, 16, 16, 24, 24, 24, 32, 32, 32]
    # capped by max_new_tokens; a single-step linear run uses the end
    assert prefix_length(PrefixConfig(schedule="linear", start=8, end=64), 0, 1, 16) == 16
    with pytest.raises(AssertionError):
        prefix_length(PrefixConfig(), total, total, M)


def test_learning_rate_schedules():
    assert [learning_rate(s, 10, peak=1.0, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [learning_rate(s, 10, peak=1.0, kind="cosine") for s in range(10)]
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5) and 0 < cos[-1] < 0.03
    assert learning_rate(5, 10, peak=2.0, kind="linear") == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------- FLOPs
@pytest.fixture(scope="module")
def eager_student(tiny_student):
    """The tiny student with eager attention, whose QK^T / AV matmuls torch's FlopCounterMode can see."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_student, attn_implementation="eager").eval()


def counted(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def square_excess(d: F.ModelDims, S: int) -> int:
    """Eager attention multiplies the full S x S score matrix; the formula counts the causal half (ideal)."""
    return 4 * d.n_layer * d.d_attn * (S * S - S * (S + 1) // 2)


def test_model_dims_by_hand(eager_student):
    cfg = eager_student.config
    d, kv, ff = (
        cfg.hidden_size,
        cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads),
        cfg.intermediate_size,
    )
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * ff
    dims = F.dims_from_model(eager_student)
    assert dims == F.ModelDims(
        cfg.num_hidden_layers, d, cfg.num_hidden_layers * per_layer, cfg.vocab_size * d
    )


def test_flop_formula_matches_torch_flop_counter(eager_student):
    from trainer.sampling import generate

    dims = F.dims_from_model(eager_student)
    P, G = 13, 9
    ids = torch.randint(4, 500, (1, P + G))
    with torch.no_grad():  # one full forward: everything but the causal half of attention is counted the same
        got = counted(lambda: eager_student(ids))
    assert got == F.forward_flops(dims, P + G) + square_excess(dims, P + G)
    # training: forward + backward with logits on the G completion positions = 3 x forward
    eager_student.train()
    got = counted(lambda: eager_student(ids, logits_to_keep=G).logits.sum().backward())
    eager_student.eval()
    assert got == F.training_flops(dims, P, G) + 3 * square_excess(dims, P + G)
    # sampling with our KV-cache generator: prefill (square) + G - 1 cached steps (each exactly as counted)
    got = counted(lambda: generate(eager_student, [ids[0, :P].tolist()], G, eos_id=None, pad_id=0))
    assert got == F.sampling_flops(dims, P, G) + square_excess(dims, P)
    assert F.teacher_flops(dims, P, G) == F.forward_flops(dims, P + G, 0, G)


def test_prefix_costs_less_than_full_and_step_flops_sum():
    d = F.ModelDims(n_layer=4, d_attn=256, layer_params=3_000_000, head_params=12_000_000)
    t = F.ModelDims(n_layer=8, d_attn=512, layer_params=25_000_000, head_params=25_000_000)
    P = [30, 41]

    def on_policy(G):
        return [F.RolloutTokens(p, sampled=G, scored=G, trained=G) for p in P]

    full = F.step_flops(on_policy(256), student=d, teacher=t, sampler=d)
    pref = F.step_flops(on_policy(16), student=d, teacher=t, sampler=d)
    assert pref.total < full.total / 5
    assert full.sampling == sum(F.sampling_flops(d, p, 256) for p in P)
    assert (full + pref).total == full.total + pref.total
    assert F.step_flops(on_policy(16), student=d, teacher=None, sampler=d).teacher == 0
    assert F.sampling_flops(d, 10, 0) == 0 and F.sampling_flops(d, 10, 1) == F.forward_flops(d, 10, 0, 1)
    # The teacher's prompt reuse: K prompt tokens not computed save their parameter and attention FLOPs
    # (positions 1..K), and nothing else: the scored tokens still attend to all P + t keys.
    K = 25
    saved = 2 * t.layer_params * K + 4 * t.n_layer * t.d_attn * K * (K + 1) // 2
    assert F.teacher_flops(t, 30, 16, K) == F.teacher_flops(t, 30, 16) - saved
    reused = [F.RolloutTokens(p, sampled=16, scored=16, trained=16, teacher_reused=p) for p in P]
    got = F.step_flops(reused, student=d, teacher=t, sampler=d)
    assert got.teacher == sum(F.teacher_flops(t, p, 16) for p in P), "charged in full whatever was reused"
    assert got.teacher_saved == sum(F.teacher_flops(t, p, 16) - F.forward_flops(t, 16, p, 16) for p in P)
    assert got.total == got.sampling + got.training + got.teacher
    # sampling = prefill + one forward per later token, by the definition
    assert F.sampling_flops(d, 10, 5) == F.forward_flops(d, 10, 0, 1) + sum(
        F.forward_flops(d, 1, 10 + j, 1) for j in range(4)
    )


def test_rollout_flops_by_hand():
    """A tail rollout anchored to the reference: P = 5, 6 tokens sampled by the teacher copy, the first 2 scored,
    all 6 trained, a reference forward over all 6; every term written out from F(n, c, g) by hand."""
    s = F.ModelDims(n_layer=2, d_attn=8, layer_params=100, head_params=30)
    t = F.ModelDims(n_layer=3, d_attn=16, layer_params=400, head_params=60)

    def fwd(d, n, c, g):  # F(n, c, g) of the module docstring, term by term
        return (
            2 * d.layer_params * n
            + 2 * d.head_params * g
            + 4 * d.n_layer * d.d_attn * sum(range(c + 1, c + n + 1))
        )

    r = F.RolloutTokens(prompt=5, sampled=6, scored=2, trained=6, reference=6)
    got = F.rollout_flops(r, student=s, teacher=t, sampler=t)
    assert got.sampling == fwd(t, 5, 0, 1) + sum(fwd(t, 1, 5 + j - 1, 1) for j in range(1, 6))
    assert got.training == 3 * fwd(s, 11, 0, 6) + fwd(s, 11, 0, 6)
    assert got.teacher == fwd(t, 7, 0, 2)
    # gold with nll: nothing sampled, nothing scored; an unknown teacher counts 0
    gold = F.RolloutTokens(prompt=5, sampled=0, scored=0, trained=3)
    assert F.rollout_flops(gold, student=s, teacher=t, sampler=None) == F.StepFlops(0, 3 * fwd(s, 8, 0, 3), 0)
    assert F.step_flops([r, gold], student=s, teacher=None, sampler=t) == F.StepFlops(
        got.sampling, got.training + 3 * fwd(s, 8, 0, 3), 0
    )
    with pytest.raises(AssertionError):
        F.RolloutTokens(prompt=5, sampled=2, scored=3, trained=2)  # more scored than trained


# ---------------------------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def student(tiny_student):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_student).eval(), AutoTokenizer.from_pretrained(
        tiny_student
    )


def test_sampling_records_logprobs_of_a_full_forward_and_is_seeded(student):
    from trainer.sampling import generate, student_logprobs

    model, tok = student
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20]]
    ro = generate(
        model,
        prompts,
        10,
        eos_id=None,
        pad_id=tok.pad_token_id,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert ro.ids_BT.shape == (3, 10) and ro.lengths == [10, 10, 10]
    for i, p in enumerate(prompts):  # each row alone, no cache, no padding
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + ro.completion(i)])).logits[0].float(), -1)
        want = lp[len(p) - 1 : len(p) - 1 + 10].gather(1, torch.tensor(ro.completion(i))[:, None]).squeeze(1)
        torch.testing.assert_close(ro.sample_lp_BT[i], want, atol=1e-5, rtol=0)
    # the training-time layout computes the same log-probabilities, with a gradient
    lp_BTV = student_logprobs(model, ro)
    assert lp_BTV.requires_grad and lp_BTV.shape == (3, 10, model.config.vocab_size)
    torch.testing.assert_close(
        lp_BTV.gather(-1, ro.ids_BT[..., None]).squeeze(-1).detach(), ro.sample_lp_BT, atol=1e-5, rtol=0
    )
    again = generate(
        model, prompts, 10, eos_id=None, pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(again.ids_BT, ro.ids_BT)
    other = generate(
        model, prompts, 10, eos_id=None, pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(1)
    )
    assert not torch.equal(other.ids_BT, ro.ids_BT)


def test_greedy_matches_transformers_generate_and_temperature_scales(student):
    from trainer.sampling import generate

    model, tok = student
    prompt = tok("Question: what is 3 + 4?\nAnswer:", add_special_tokens=False)["input_ids"]
    ro = generate(model, [prompt], 12, eos_id=None, pad_id=tok.pad_token_id, temperature=0.0)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    assert ro.completion(0) == ref[0, len(prompt) :].tolist()
    # at temperature T the recorded log-probability is log softmax(logits / T) of the sampled token
    ro = generate(
        model,
        [prompt],
        1,
        eos_id=None,
        pad_id=tok.pad_token_id,
        temperature=0.5,
        generator=torch.Generator().manual_seed(3),
    )
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
    assert ro.sample_lp_BT[0, 0].item() == pytest.approx(
        torch.log_softmax(logits / 0.5, -1)[ro.ids_BT[0, 0]].item(), abs=1e-5
    )


def test_generation_stops_rows_at_eos_and_masks_after(student):
    from trainer.sampling import generate

    model, tok = student
    prompts = [[5, 7, 9], [30, 31], [44]]
    free = generate(model, prompts, 12, eos_id=None, pad_id=tok.pad_token_id, temperature=0.0)
    stop = free.completion(0)[3]  # treat row 0's 4th greedy token as EOS
    ro = generate(model, prompts, 12, eos_id=stop, pad_id=tok.pad_token_id, temperature=0.0)
    for i in range(3):  # each row: its free-running greedy answer cut right after its first `stop` (kept)
        row = free.completion(i)
        want = row[: row.index(stop) + 1] if stop in row else row
        assert ro.completion(i) == want
        assert ro.mask_BT[i, len(want) :].sum() == 0 and (ro.ids_BT[i, len(want) :] == tok.pad_token_id).all()
    assert ro.lengths[0] <= 4 and ro.ids_BT.shape[1] == max(ro.lengths)
    torch.testing.assert_close(ro.sample_lp_BT[0, : ro.lengths[0]], free.sample_lp_BT[0, : ro.lengths[0]])


# ---------------------------------------------------------------------------------------------------- tasks
def test_arith_task_is_deterministic_disjoint_and_correct():
    a, b = arith_task(), arith_task()
    assert a.heldout == b.heldout and a.train[:50] == b.train[:50]
    assert len(a.heldout) == 200 and len(a.train) == 2000
    assert not {e.prompt for e in a.heldout} & {e.prompt for e in a.train}
    for ex in a.heldout[:100]:  # recompute every answer from the question text
        nums = [int(x) for x in re.findall(r"\d+", ex.prompt.split(" Think")[0])]
        q = ex.prompt
        if "+" in q or "more" in q and "loses" not in q:
            want = nums[0] + nums[1]
        elif "loses" in q:
            want = nums[0] + nums[1] - nums[2]
        elif "bags" in q:
            want = nums[0] * nums[1]
        else:
            want = nums[0] - nums[1]
        assert ex.answer == str(want), q


def test_validation_split_is_fixed_part_of_train_and_never_touches_heldout():
    for name in ("plan", "chain"):
        task = load_task(f"builtin:{name}")
        val, again = task.validation(), load_task(f"builtin:{name}").validation()
        assert val.heldout == again.heldout and len(val.heldout) == 150
        prompts = lambda xs: {e.prompt for e in xs}  # noqa: E731
        assert prompts(val.heldout) | prompts(val.train) == prompts(task.train)
        assert not prompts(val.heldout) & prompts(val.train)
        assert not (prompts(val.heldout) | prompts(val.train)) & prompts(task.heldout)


def test_answer_checker():
    assert extract_answer("3 + 4 = 7. Answer: 7") == "7"
    assert extract_answer("First 2 + 2 = 4, then the answer is 12.") == "12"
    assert extract_answer("so we get 1,000 apples") == "1000"
    assert extract_answer("#### 42") == "42" and extract_answer("no digits") is None
    assert is_correct("The answer is: 6", "6") and is_correct("Answer: 7.0", "7")
    assert not is_correct("Answer: 17", "7") and not is_correct("", "7")
    # the marked answer wins over a later number
    assert extract_answer("Answer: 9. (3 + 6 = 9 is 1 step)") == "9"


def test_jsonl_prompts_and_rendering(tmp_path, student):
    _, tok = student
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(f'{{"prompt": "q{i}", "answer": "{i}"}}' for i in range(20)) + "\n")
    task = load_task(str(p))
    assert len(task.train) == 18 and [e.prompt for e in task.heldout] == ["q9", "q19"]
    p.write_text('{"prompt": "a", "split": "eval"}\n{"prompt": "b"}\n')
    task = load_task(str(p))
    assert [e.prompt for e in task.train] == ["b"] and [e.prompt for e in task.heldout] == ["a"]
    p.write_text('{"answer": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: each line needs a non-empty string `prompt`"):
        load_task(str(p))
    with pytest.raises(ValueError, match="builtin:arith"):
        load_task("builtin:nope")
    ex = task.train[0]
    assert render(ex, tok, "raw") == tok("b", add_special_tokens=False)["input_ids"]
    assert tok.decode(render(ex, tok, "auto")) == "Question: b\nAnswer:"  # no chat template: plain format
    with pytest.raises(ValueError, match="no chat template"):
        render(ex, tok, "chat")


# ---------------------------------------------------------------------------------------------------- teacher I/O
def test_teacher_io_keeps_no_retry_loop_of_its_own(tiny_teacher, student):
    """Retries are the client's alone: what still fails after them reaches the trainer at once, once."""
    import numpy as np

    from services.teacher.errors import InvalidRequest, QueueFull
    from services.teacher.types import ScoreRequest
    from trainer.losses import Need
    from trainer.teacher_io import TeacherIO, check_teacher

    io = TeacherIO(f"inprocess:{tiny_teacher}")
    try:
        real, calls = io.client.score_many, []

        async def exhausted(requests):
            calls.append(len(requests))
            raise QueueFull("job queue full", "job_id", retry_after_s=0.01)

        io.client.score_many = exhausted
        req = ScoreRequest(np.array([5, 6]), np.array([7, 8, 9]), request_id="a")
        with pytest.raises(QueueFull):
            io.score([req])
        assert calls == [1]  # no resubmit of the micro-batch
        io.client.score_many = real
        (res,) = io.score([req])
        assert res.request_id == "a" and res.token_logprobs.shape == (3,)
        assert io.stats.take()["teacher/retries"] == 0
        with pytest.raises(InvalidRequest, match="top_k"):
            io.score([ScoreRequest(np.array([5]), np.array([7]), top_k=10_000)])
        # the compatibility check passes for a student sharing the tokenizer
        _, tok = student
        check_teacher(io.model_info(), tok, 512, student="s", need=Need.TOPK, top_k=8)
    finally:
        io.close()
