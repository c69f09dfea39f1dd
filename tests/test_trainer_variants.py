"""The trainer's variants against independent computations, with the in-process teacher (a real engine, no
service): gold and teacher-written rollouts, the nll loss, tail rollouts and their KL anchor to the starting
student, the L2 anchor, frozen parameters, resuming with anchors, and the FLOPs of every mode written out by
hand from the documented formula. The stages (`set_up`, `prepare_minibatch`, `train_step`) are called directly
where a test must see a step's rollouts; everything else runs `train`."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from types import SimpleNamespace

import pytest
import torch
from test_trainer_e2e import closed_form, equal_length_prompts

from trainer.config import ConfigError, load_config
from trainer.distributed import Dist
from trainer.loop import log_step, train, train_step
from trainer.metrics import read_metrics
from trainer.rollouts import prepare_minibatch, row_limits, teacher_model_path
from trainer.setup import set_up


def config(student, teacher, out, *extra):
    return load_config(
        None,
        [
            f"student={student}",
            f"teacher=inprocess:{teacher}",
            f"output_dir={out}",
            "progress_bar=false",
            "tensorboard=false",
            "max_new_tokens=8",
            "prefix.length=4",
            "eval.max_new_tokens=4",
            "eval.prompts=2",
            "eval.at_start=false",
            *extra,
        ],
    )


@contextlib.contextmanager
def started(cfg):
    """A run set up as `train` sets it up (one process, CPU), closed afterwards."""
    with contextlib.ExitStack() as closing:
        yield set_up(
            cfg, Dist(), torch.device("cpu"), resume=False, t_start=time.perf_counter(), closing=closing
        )


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@torch.no_grad()
def plain_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0):
    """(C, V) log p(. | prompt, completion[:t]) for each completion position: one unpadded sequence."""
    logits = model(torch.tensor([prompt + completion])).logits[0].float()
    start = len(prompt) - 1
    return torch.log_softmax(logits[start : start + len(completion)] / temperature, -1)


def rows_of(mb):
    """(prompt ids, completion ids) of every rollout of a minibatch, in rollout order."""
    return [(m.ro.prompt_ids[i], m.ro.completion(i)) for m in mb.micro for i in range(len(m.ro.prompt_ids))]


def answers_file(path, tok, answers: list[str]):
    """A JSONL with one raw prompt per answer (and one held-out line); returns {prompt ids: answer}."""
    lines = [{"prompt": f"q{i} =", "answer": a, "split": "train"} for i, a in enumerate(answers)]
    lines.append({"prompt": "held =", "answer": "1", "split": "eval"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {tuple(tok(x["prompt"], add_special_tokens=False)["input_ids"]): x["answer"] for x in lines}


# ---------------------------------------------------------------------------------------------------- sources
def test_gold_rollouts_are_the_answers_cut_to_L_and_nll_is_their_cross_entropy(
    tiny_student, tiny_teacher, tmp_path
):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_student)
    answers = answers_file(tmp_path / "p.jsonl", tok, ["7", "12 apples", "a much longer answer that runs on"])
    cfg = config(
        tiny_student,
        tiny_teacher,
        tmp_path / "run",
        f"prompts={tmp_path / 'p.jsonl'}",
        "prompt_format=raw",
        "rollouts.source=gold",
        "loss=nll",
        "prefix.length=4",
        "batch_size=6",
        "micro_batch_size=4",
    )
    student = load(tiny_student)
    with started(cfg) as run:
        mb = prepare_minibatch(run, 0)
        assert all(m.scores is None for m in mb.micro)  # nll: nothing is sent to the teacher
        want_loss = 0.0
        for prompt, completion in rows_of(mb):
            gold = tok(answers[tuple(prompt)], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert completion == gold[:4]
            lp = plain_logprobs(student, prompt, completion)
            want_loss += float(
                torch.nn.functional.cross_entropy(lp, torch.tensor(completion), reduction="sum")
            )
        assert {len(c) for _, c in rows_of(mb)} >= {2, 4}  # "7" + EOS fits; the long answer is cut
        res = train_step(run, mb)
    assert res.loss_sum == pytest.approx(want_loss, rel=1e-5)

    (tmp_path / "q.jsonl").write_text('{"prompt": "no answer here"}\n' * 3)
    with pytest.raises(ConfigError, match="`rollouts.source` is 'gold' but 3 of the 3 training prompts"):
        train(config(tiny_student, tiny_teacher, tmp_path / "bad", f"prompts={tmp_path / 'q.jsonl'}",
                     "rollouts.source=gold"))  # fmt: skip


def test_teacher_rollouts_carry_the_teachers_own_logprobs(
    tiny_student, tiny_teacher, tiny_other_tokenizer, tmp_path
):
    cfg = config(
        tiny_student,
        tiny_teacher,
        tmp_path / "run",
        "rollouts.source=teacher",
        "temperature=0.7",
        "prefix.length=6",
        "batch_size=3",
        "micro_batch_size=2",
        "loss=reverse_kl_full",
    )
    teacher, student = load(tiny_teacher), load(tiny_student)
    with started(cfg) as run:
        assert run.source.model is not run.model
        mb = prepare_minibatch(run, 0)
        for m in mb.micro:
            scored = m.scores.result()  # the teacher service still scores them (temperature 1)
            for i, n in enumerate(m.ro.lengths):
                prompt, completion = m.ro.prompt_ids[i], m.ro.completion(i)
                ids = torch.tensor(completion)[:, None]
                sampled = plain_logprobs(teacher, prompt, completion, 0.7).gather(1, ids).squeeze(1)
                torch.testing.assert_close(m.ro.sample_lp_BT[i, :n], sampled, atol=1e-5, rtol=0)
                at_1 = plain_logprobs(teacher, prompt, completion).gather(1, ids).squeeze(1)
                torch.testing.assert_close(
                    torch.from_numpy(scored[i].token_logprobs), at_1, atol=1e-4, rtol=0
                )
                # not the student's tokens: the student gives them other probabilities
                s_lp = plain_logprobs(student, prompt, completion).gather(1, ids).squeeze(1)
                assert (s_lp - at_1).abs().max() > 0.1
        train_step(run, mb)

    # the sampling model: rollouts.model, else the teacher's model id when it is a folder, else inprocess:PATH
    assert teacher_model_path(cfg, SimpleNamespace(model_id=str(tiny_teacher))) == str(tiny_teacher)
    remote = load_config(None, ["student=s", "teacher=grpc://h:1", "rollouts.source=teacher"])
    with pytest.raises(ConfigError, match="`rollouts.model` is required"):
        teacher_model_path(remote, SimpleNamespace(model_id="org/remote-teacher"))
    with pytest.raises(ConfigError, match="`rollouts.model` .* must share the student's tokenizer"):
        train(config(tiny_student, tiny_teacher, tmp_path / "bad", "rollouts.source=teacher",
                     f"rollouts.model={tiny_other_tokenizer}"))  # fmt: skip


# ---------------------------------------------------------------------------------------------------- anchors
def test_row_limits_take_the_first_round_f_n_rollouts_to_full_length():
    assert row_limits(8, 2, 7, 0.3) == [7, 7] + [2] * 6  # round(2.4) = 2
    assert row_limits(5, 2, 7, 0.45) == [7, 7, 2, 2, 2]  # round(2.25) = 2
    assert row_limits(4, 2, 7, 0.0) == [2] * 4 and row_limits(4, 2, 7, 1.0) == [7] * 4
    assert row_limits(4, 7, 7, 0.5) == [7] * 4  # L = max_new_tokens: nothing to add


def test_tail_rollouts_are_scored_on_L_tokens_and_anchored_to_the_starting_student(
    tiny_student, tiny_teacher, tmp_path
):
    L, M, l2, weight = 2, 7, 0.5, 0.7
    cfg = config(
        tiny_student,
        tiny_teacher,
        tmp_path / "run",
        f"prefix.length={L}",
        f"max_new_tokens={M}",
        "stop_at_eos=false",
        "batch_size=5",
        "micro_batch_size=3",
        "anchor.tail_fraction=0.45",
        f"anchor.l2={l2}",
        f"anchor.tail_weight={weight}",
        "lr=1e-9",
    )
    with started(cfg) as run:
        with torch.no_grad():  # a known move away from the starting weights: 64 entries + 0.5
            run.model.model.norm.weight += 0.5
        mb = prepare_minibatch(run, 0)
        lengths = [len(c) for _, c in rows_of(mb)]
        assert lengths == [M, M, L, L, L] and mb.tail_rollouts == round(0.45 * 5)
        for m in mb.micro:  # the teacher was sent only the first L tokens of every rollout
            assert [r.token_logprobs.shape[0] for r in m.scores.result()] == [L] * len(m.ro.lengths)
        res = train_step(run, mb)
        log_step(run, 1, mb, res, time.perf_counter())

    # Independently: the moved student and the reference (the student folder) through plain forwards.
    moved, reference = load(tiny_student), load(tiny_student)
    with torch.no_grad():
        moved.model.norm.weight += 0.5
    want_tail = 0.0
    for prompt, completion in rows_of(mb)[:2]:
        s = plain_logprobs(moved, prompt, completion)[L:]
        r = plain_logprobs(reference, prompt, completion)[L:]
        want_tail += float((s.exp() * (s - r)).sum())
    assert want_tail > 0.01
    assert res.tail_sum == pytest.approx(weight * want_tail, rel=1e-4)
    assert res.anchor_l2 == pytest.approx(l2 * 64 * 0.5**2, rel=1e-6)
    (row,) = [r for r in read_metrics(tmp_path / "run") if "loss/anchor_l2" in r]
    assert row["loss/anchor_l2"] == pytest.approx(l2 * 64 * 0.25, rel=1e-6)
    assert row["loss/anchor_tail"] == pytest.approx(weight * want_tail / sum(lengths), rel=1e-4)
    assert row["progress/tail_rollouts"] == 2 and row["teacher/tokens_scored"] == 5 * L


def distance_from(path, model_dir) -> float:
    start, end = load(path).state_dict(), load(model_dir).state_dict()
    return sum(float(((end[k] - start[k]) ** 2).sum()) for k in start)


def test_a_large_l2_anchor_keeps_the_weights_near_the_start(tiny_student, tiny_teacher, tmp_path):
    common = ["steps=6", "batch_size=4", "prefix.length=4", "lr=1e-2", "eval.prompts=1"]
    for l2 in (0, 100):
        train(config(tiny_student, tiny_teacher, tmp_path / f"l2-{l2}", *common, f"anchor.l2={l2}"))
    free = distance_from(tiny_student, tmp_path / "l2-0" / "final")
    anchored = distance_from(tiny_student, tmp_path / "l2-100" / "final")
    print(f"squared distance from the start: free {free:.4g}, anchored {anchored:.4g}")
    assert anchored < 0.3 * free


def test_resume_with_anchors_reproduces_the_run(tiny_student, tiny_teacher, tmp_path):
    out = tmp_path / "run"
    cfg = config(tiny_student, tiny_teacher, out, "steps=4", "save_every=2", "batch_size=4",
                 "micro_batch_size=2", "prefix.length=2", "max_new_tokens=6", "lr=3e-3", "anchor.l2=1.0",
                 "anchor.tail_fraction=0.5", "freeze=[model.embed_tokens]", "seed=3")  # fmt: skip
    train(cfg)
    whole = [r for r in read_metrics(out) if "loss/anchor_l2" in r]
    shutil.rmtree(out / "checkpoints" / "step-000004")
    shutil.rmtree(out / "final")
    train(cfg, resume=True)
    resumed = [r for r in read_metrics(out) if "loss/anchor_l2" in r]
    assert (
        len(whole) == len(resumed) == 4 and whole[2]["loss/anchor_l2"] > 0
    )  # theta0 is the start, not step 2
    for a, b in zip(whole, resumed, strict=True):
        for k in a:
            if k.startswith(("loss/", "flops/", "progress/")):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-9), (a["step"], k)


# ---------------------------------------------------------------------------------------------------- freeze
def test_frozen_parameters_stay_bit_identical(tiny_student, tiny_teacher, tmp_path):
    frozen = ("model.embed_tokens", "model.layers.0")
    cfg = config(tiny_student, tiny_teacher, tmp_path / "run", "steps=3", "batch_size=4", "prefix.length=4",
                 "lr=1e-2", f"freeze=[{','.join(frozen)}]")  # fmt: skip
    train(cfg)
    start, end = load(tiny_student), load(tmp_path / "run" / "final")
    ends = dict(end.named_parameters())
    n_frozen = 0
    for name, p in start.named_parameters():
        if name.startswith(frozen):
            n_frozen += 1
            assert torch.equal(p, ends[name]), name
        else:
            assert not torch.equal(p, ends[name]), name
    assert n_frozen == 1 + 9  # the embeddings and layer 0's 7 matrices and 2 norms

    with started(cfg) as run:  # the optimizer holds the trained parameters only
        in_opt = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
        assert in_opt == {id(p) for n, p in run.model.named_parameters() if not n.startswith(frozen)}
    with pytest.raises(ConfigError, match="`freeze` prefix 'model.encoder' matches no parameter"):
        train(
            config(tiny_student, tiny_teacher, tmp_path / "bad", "freeze=[model.embed_tokens,model.encoder]")
        )
    with pytest.raises(ConfigError, match="`freeze` .* leaves no parameter"):
        train(config(tiny_student, tiny_teacher, tmp_path / "all", "freeze=[model,lm_head]"))


# ---------------------------------------------------------------------------------------------------- FLOPs
def test_flops_of_every_mode_follow_the_formula(tiny_student, tiny_teacher, tmp_path):
    """One step of 3 rollouts with a P-token prompt, L = 2, max_new_tokens M = 6, no EOS stop: each mode's
    sampling, training and teacher FLOPs written out from the documented formula (closed_form)."""
    from transformers import AutoTokenizer

    P = equal_length_prompts(AutoTokenizer.from_pretrained(tiny_student), tmp_path / "p.jsonl")
    L, M = 2, 6
    student, teacher = load(tiny_student), load(tiny_teacher)
    s_sample = {g: closed_form(student, P, g)[0] for g in (L, M)}
    s_train = {g: closed_form(student, P, g)[1] for g in (L, M)}
    s_forward = {g: closed_form(student, P, g)[2] for g in (L, M)}
    t_sample = {g: closed_form(teacher, P, g)[0] for g in (L, M)}
    t_score = {g: closed_form(teacher, P, g)[2] for g in (L, M)}
    modes = {  # name: (overrides, (sampling, training, teacher))
        "opd": ([], (3 * s_sample[L], 3 * s_train[L], 3 * t_score[L])),
        "nll": (["loss=nll"], (3 * s_sample[L], 3 * s_train[L], 0)),
        "offpolicy": (["rollouts.source=teacher"], (3 * t_sample[L], 3 * s_train[L], 3 * t_score[L])),
        "gold": (["rollouts.source=gold", "loss=reverse_kl_full"], (0, 3 * s_train[L], 3 * t_score[L])),
        "tail-teacher": (
            ["anchor.tail_fraction=0.34", "anchor.tail_target=teacher"],
            (s_sample[M] + 2 * s_sample[L], s_train[M] + 2 * s_train[L], t_score[M] + 2 * t_score[L]),
        ),
        "tail-reference": (  # the tail rollout: scored on L tokens, plus one reference forward over P + M
            ["anchor.tail_fraction=0.34"],
            (s_sample[M] + 2 * s_sample[L], s_train[M] + s_forward[M] + 2 * s_train[L], 3 * t_score[L]),
        ),
    }
    for name, (sets, want) in modes.items():
        out = tmp_path / name
        train(config(tiny_student, tiny_teacher, out, f"prompts={tmp_path / 'p.jsonl'}", "prompt_format=raw",
                     "steps=1", "batch_size=3", f"prefix.length={L}", f"max_new_tokens={M}", "stop_at_eos=false",
                     "eval.prompts=1", *sets))  # fmt: skip
        (row,) = [r for r in read_metrics(out) if "flops/total" in r]
        assert (row["flops/sampling"], row["flops/training"], row["flops/teacher"]) == want, name
        assert row["flops/total"] == sum(want), name


# ------------------------------------------------------------------------------------------------ eval.split
def test_validation_split_evaluates_on_training_prompts_left_out_of_training(
    tiny_student, tiny_teacher, tmp_path
):
    from trainer.tasks import load_task

    task = load_task("builtin:plan")
    val = task.validation()
    cfg = config(tiny_student, tiny_teacher, tmp_path, "prompts=builtin:plan", "eval.split=validation",
                 "eval.prompts=150")  # fmt: skip
    with started(cfg) as run:
        assert run.held_ex == val.heldout  # evaluated on the validation part of the training prompts
        trained = {tuple(ids) for ids in run.train_ids}
        assert len(trained) == len(task.train) - 150
        tok = run.tokenizer
        for ex in val.heldout + task.heldout:  # neither a validation nor a held-out prompt is trained on
            assert tuple(tok(ex.prompt, add_special_tokens=False)["input_ids"]) not in trained


# ------------------------------------------------------------------------------------------------------ LoRA
def test_lora_trains_only_low_rank_adapters_and_writes_a_merged_final_model(
    tiny_student, tiny_teacher, tmp_path
):
    """lora.rank=4 on q/v: the base weights stay as they were, each adapted matrix moves by a rank <= 4 update,
    final/ loads as a plain model (the merged weights) and final/lora holds the adapter; resuming continues."""
    out = tmp_path / "lora"
    cfg = config(tiny_student, tiny_teacher, out, "steps=3", "lr=1e-2", "lora.rank=4", "lora.alpha=8",
                 "lora.target_modules=[q_proj,v_proj]", "save_every=2", "loss=reverse_kl_full")  # fmt: skip
    with started(cfg) as run:
        trained = [n for n, p in run.model.named_parameters() if p.requires_grad]
        assert trained and all("lora_" in n for n in trained), trained
    train(cfg)
    before, after = load(tiny_student), load(out / "final")
    assert (out / "final" / "lora" / "adapter_config.json").exists()
    sb, sa = before.state_dict(), after.state_dict()
    assert set(sb) == set(sa), "the merged model has the base model's parameters, no adapter left"
    moved = 0
    for name, w0 in sb.items():
        delta = sa[name] - w0
        if any(m in name for m in ("q_proj", "v_proj")):
            assert torch.linalg.matrix_rank(delta).item() <= 4, name
            moved += int(delta.abs().max() > 0)
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), f"{name} is not adapted and must not move"
    assert moved > 0
    shutil.rmtree(out / "final")
    summary = train(cfg, resume=True)
    assert summary.steps == 3 and (out / "final" / "lora").exists()


def test_lora_refuses_freeze():
    with pytest.raises(ConfigError, match="`freeze` cannot be combined with lora.rank"):
        load_config(None, ["student=s", "teacher=t", "lora.rank=4", "freeze=[model.layers]"])
