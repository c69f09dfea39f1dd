"""Held-out evaluation: greedy full-length answers, exact-match accuracy and per-token reverse KL to the teacher.

On the decision tasks (services.models.decisions) two more figures say *what* the student learned:
eval/agreement, the share of decision points where the student's greedy answer writes the teacher's most
likely token (after the student's own prefix: the teacher's greedy decision there), and eval/execution, the
accuracy of answers written with the teacher's preferred decisions forced (did the rest of the answer survive
the training?). Accuracy only says an answer is valid, and a shortcut can be valid.

The KL is measured on the student's own greedy answers (the distribution it will actually produce), position by
position: KL(p_S(. | prompt, a_<t) || p_T(. | prompt, a_<t)), with the loss table's reverse KL: exact over full
vocabulary rows, or bucketed over the teacher's top-k with a tail when full rows are unavailable (then a lower
bound). Positions t < head_tokens form the head (eval/kl_head), the rest the tail (eval/kl_tail): prefix-only
training shows up as a head that improves faster than the tail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from trainer.losses import LOSSES, Need, TeacherBatch, compute_loss
from trainer.sampling import Rollouts, generate, pad_id_of, student_logprobs
from trainer.tasks import Example
from trainer.teacher_io import TeacherIO, build_requests, to_teacher_batch

# The evaluation KL: the loss table's reverse KL on what the teacher sends (full rows, else its top-k).
EVAL_KL = {Need.FULL: "reverse_kl_full", Need.TOPK: "reverse_kl_topk"}
assert all(LOSSES[name].need == need for need, name in EVAL_KL.items())


@dataclass
class EvalResult:
    metrics: dict[str, float]
    """eval/accuracy (when answers exist), eval/kl, eval/kl_head, eval/kl_tail, eval/response_tokens, ..."""
    samples: list[dict] = field(default_factory=list)
    """The first few prompts with the student's answer and whether it is correct."""


@dataclass
class _Tally:
    """Running sums of an evaluation, batch by batch."""

    kl_sum: dict[str, float] = field(default_factory=lambda: {"head": 0.0, "tail": 0.0})
    kl_count: dict[str, int] = field(default_factory=lambda: {"head": 0, "tail": 0})
    correct: int = 0
    answered: int = 0
    eos_hits: int = 0
    tokens: int = 0
    agreed: int = 0
    decisions: int = 0
    executed: int = 0
    forced: int = 0
    samples: list[dict] = field(default_factory=list)

    def add_agreement(self, ro: Rollouts, examples: list[Example], teacher_top_BT: torch.Tensor) -> None:
        """Decision points of the batch's answers: whether the student wrote the teacher's greedy choice there
        (teacher_top_BT (B, T): the teacher's most likely id after the student's own prefix); a point the
        answer never reached counts as a disagreement."""
        for j, ex in enumerate(examples):
            task = ex.decisions
            if task is None:
                continue
            n = ro.lengths[j]
            for p in task.points:
                self.decisions += 1
                self.agreed += int(p < n and int(ro.ids_BT[j, p]) == int(teacher_top_BT[j, p]))

    def add_execution(self, ro: Rollouts, examples: list[Example], tokenizer) -> None:
        """Answers written with the teacher's preferred decisions forced: how many are correct."""
        for j, ex in enumerate(examples):
            self.forced += 1
            self.executed += int(ex.is_correct(tokenizer.decode(ro.completion(j), skip_special_tokens=True)))

    def add_kl(self, kl_BT: torch.Tensor, mask_BT: torch.Tensor, head_tokens: int) -> None:
        """Per-token KL (B, T) of a batch, split at `head_tokens` into head and tail."""
        head_BT = torch.zeros_like(mask_BT)
        head_BT[:, :head_tokens] = 1.0
        for part, m in (("head", mask_BT * head_BT), ("tail", mask_BT * (1 - head_BT))):
            self.kl_sum[part] += float((kl_BT * m).sum())
            self.kl_count[part] += int(m.sum())

    def add_answers(self, ro: Rollouts, examples: list[Example], tokenizer, n_samples: int) -> None:
        """The batch's greedy answers (row j of `ro` answers `examples[j]`): length, EOS, correctness, samples."""
        eos = tokenizer.eos_token_id
        for j, ex in enumerate(examples):
            comp = ro.completion(j)
            self.tokens += len(comp)
            self.eos_hits += int(eos is not None and len(comp) > 0 and comp[-1] == eos)
            text = tokenizer.decode(comp, skip_special_tokens=True)
            ok = None
            if ex.answer is not None:
                ok = ex.is_correct(text)
                self.answered += 1
                self.correct += int(ok)
            if len(self.samples) < n_samples:
                self.samples.append(
                    {"prompt": ex.prompt, "answer": ex.answer, "response": text, "correct": ok}
                )

    def metrics(self, n_prompts: int) -> dict[str, float]:
        n = max(1, n_prompts)
        out = {
            "eval/kl": sum(self.kl_sum.values()) / max(1, sum(self.kl_count.values())),
            "eval/kl_head": self.kl_sum["head"] / max(1, self.kl_count["head"]),
            "eval/response_tokens": self.tokens / n,
            "eval/eos_rate": self.eos_hits / n,
            "eval/prompts": float(n_prompts),
        }
        if self.kl_count["tail"]:  # absent when every answer ended within the head
            out["eval/kl_tail"] = self.kl_sum["tail"] / self.kl_count["tail"]
        if self.answered:
            out["eval/accuracy"] = self.correct / self.answered
        if self.decisions:
            out["eval/agreement"] = self.agreed / self.decisions
        if self.forced:
            out["eval/execution"] = self.executed / self.forced
        return out


def _reverse_kl_BT(
    model, ro: Rollouts, tb: TeacherBatch, need: Need, autocast_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token KL(student || teacher) (B, T), mask (B, T)) of a batch of answers."""
    s_lp_BTV = student_logprobs(model, ro, autocast_dtype=autocast_dtype)
    mask_BT = ro.mask_BT.to(s_lp_BTV.device)
    ids_BT = ro.ids_BT.to(s_lp_BTV.device)
    return compute_loss(EVAL_KL[need], s_lp_BTV, ids_BT, tb, mask_BT, reduction="none"), mask_BT


def _light_length(example: Example, length: int) -> int:
    """Completion positions a light evaluation has the teacher score: up to the last decision point (>= 1)."""
    task = example.decisions
    last = max(task.points) if task is not None else 0
    return max(1, min(length, last + 1))


def _execution(model, tokenizer, examples, prompt_ids, tally: _Tally, max_new_tokens, batch_size, autocast):
    """eval/execution: greedy answers with the teacher's preferred decision forced at every decision point
    (Example.forced_decisions), checked like any answer: does the student still carry a decision out?"""
    rows = [i for i, ex in enumerate(examples) if ex.decisions is not None]
    enc = tokenizer.convert_tokens_to_ids
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        forced = [{t: enc(tag) for t, tag in examples[i].forced_decisions().items()} for i in chunk]
        ro = generate(
            model,
            [prompt_ids[i] for i in chunk],
            max_new_tokens,
            eos_id=tokenizer.eos_token_id,
            pad_id=pad_id_of(tokenizer),
            temperature=0.0,
            autocast_dtype=autocast,
            forced=forced,
        )
        tally.add_execution(ro, [examples[i] for i in chunk], tokenizer)


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    examples: list[Example],
    prompt_ids: list[list[int]],
    teacher: TeacherIO,
    *,
    max_new_tokens: int,
    batch_size: int,
    head_tokens: int,
    full_rows: bool,
    top_k: int,
    vocab: int,
    job_id: str,
    teacher_temperature: float = 1.0,
    n_samples: int = 3,
    autocast_dtype: torch.dtype | None = None,
    execution: bool = True,
    light: bool = False,
) -> EvalResult:
    """Evaluates `model` on `examples` (prompt ids already rendered) against `teacher`: answers of up to
    `max_new_tokens` tokens, KL over full rows when `full_rows`, else over the teacher's `top_k` and a tail.
    On decision tasks also the agreement with the teacher's greedy decisions and, with `execution`, the
    accuracy of answers written with the teacher's preferred decisions forced. `light`: accuracy and agreement
    only (the dense evaluations of a run): the teacher is asked for its top-1 up to the last decision point,
    no KL, no execution pass."""
    t0 = time.perf_counter()
    need = Need.TOPK if light else (Need.FULL if full_rows else Need.TOPK)
    top_k = 1 if light else top_k
    execution = execution and not light
    eos = tokenizer.eos_token_id
    pad = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    tally = _Tally()

    def generate_and_submit(rows: range):
        ro = generate(
            model,
            [prompt_ids[i] for i in rows],
            max_new_tokens,
            eos_id=eos,
            pad_id=pad,
            temperature=0.0,
            autocast_dtype=autocast_dtype,
        )
        scored = (
            [_light_length(examples[i], n) for i, n in zip(rows, ro.lengths, strict=True)] if light else None
        )
        reqs = build_requests(
            ro, need=need, job_id=job_id, top_k=top_k, temperature=teacher_temperature, scored=scored
        )
        return rows, ro, teacher.submit(reqs)

    batches = [range(s, min(len(examples), s + batch_size)) for s in range(0, len(examples), batch_size)]
    pending = None  # (rows, rollouts, future) of the batch being scored while the next one is generated
    for k in range(len(batches) + 1):
        current = generate_and_submit(batches[k]) if k < len(batches) else None
        if pending is not None:
            rows, ro, fut = pending
            tb = to_teacher_batch(fut.result(), ro.ids_BT.shape[1], device, need, vocab)
            if not light:
                kl_BT, mask_BT = _reverse_kl_BT(model, ro, tb, need, autocast_dtype)
                tally.add_kl(kl_BT, mask_BT, head_tokens)
            top_BT = tb.full_lp_BTV.argmax(-1) if need == Need.FULL else tb.topk_ids_BTK[..., 0]
            tally.add_agreement(ro, [examples[i] for i in rows], top_BT.cpu())
            tally.add_answers(ro, [examples[i] for i in rows], tokenizer, n_samples)
        pending = current

    if execution:
        _execution(model, tokenizer, examples, prompt_ids, tally, max_new_tokens, batch_size, autocast_dtype)
    metrics = tally.metrics(len(examples))
    if light:
        metrics = {k: v for k, v in metrics.items() if not k.startswith("eval/kl")}
    metrics["eval/seconds"] = time.perf_counter() - t0
    return EvalResult(metrics, tally.samples)
