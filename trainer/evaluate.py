"""Held-out evaluation: greedy full-length answers, exact-match accuracy and per-token reverse KL to the teacher.

The KL is measured on the student's own greedy answers (the distribution it will actually produce), position by
position: KL(p_S(. | prompt, a_<t) || p_T(. | prompt, a_<t)), exact over full vocabulary rows (or bucketed over
the teacher's top-k with a tail when full rows are unavailable: then a lower bound). Positions t < head_tokens
form the head (eval/kl_head), the rest the tail (eval/kl_tail): prefix-only training shows up as a head that
improves faster than the tail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from trainer.losses import bucket_topk, kl_divergence
from trainer.sampling import generate, student_logprobs
from trainer.tasks import Example, is_correct
from trainer.teacher_io import TeacherIO, build_requests, to_teacher_batch


@dataclass
class EvalResult:
    metrics: dict[str, float]
    """eval/accuracy (when answers exist), eval/kl, eval/kl_head, eval/kl_tail, eval/response_tokens, ..."""
    samples: list[dict] = field(default_factory=list)
    """The first few prompts with the student's answer and whether it is correct."""


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
    vocab: int,
    job_id: str,
    teacher_temperature: float = 1.0,
    max_top_k: int = 64,
    n_samples: int = 3,
    autocast_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Evaluates `model` on `examples` (prompt ids already rendered) against `teacher`."""
    t0 = time.perf_counter()
    need = "full" if full_rows else "topk"
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    device = next(model.parameters()).device
    sums = {"head": 0.0, "tail": 0.0}
    counts = {"head": 0, "tail": 0}
    correct = answered = eos_hits = tokens = 0
    samples: list[dict] = []

    batches = [range(s, min(len(examples), s + batch_size)) for s in range(0, len(examples), batch_size)]
    pending = None  # (rows, rollouts, future) of the batch being scored while the next one is generated
    for k in range(len(batches) + 1):
        current = None
        if k < len(batches):
            rows = batches[k]
            ro = generate(
                model,
                [prompt_ids[i] for i in rows],
                max_new_tokens,
                eos_id=eos,
                pad_id=pad,
                temperature=0.0,
                autocast_dtype=autocast_dtype,
            )
            reqs = build_requests(
                ro,
                need=need,
                job_id=job_id,
                id_prefix=f"{job_id}:eval:{k}",
                top_k=max_top_k,
                temperature=teacher_temperature,
            )
            current = (rows, ro, teacher.submit(reqs))
        if pending is not None:
            rows, ro, fut = pending
            tb = to_teacher_batch(fut.result(), ro.ids_BT.shape[1], device, need, vocab)
            s_lp = student_logprobs(model, ro, autocast_dtype=autocast_dtype)
            if need == "full":
                kl_BT = kl_divergence(s_lp, tb.full_lp_BTV)
            else:
                s_b, t_b = bucket_topk(s_lp, tb.topk_ids_BTK, tb.topk_lp_BTK)
                kl_BT = kl_divergence(s_b, t_b)
            mask = ro.mask_BT.to(device)
            head = torch.zeros_like(mask)
            head[:, :head_tokens] = 1.0
            for part, m in (("head", mask * head), ("tail", mask * (1 - head))):
                sums[part] += float((kl_BT * m).sum())
                counts[part] += int(m.sum())
            for j, i in enumerate(rows):
                comp = ro.completion(j)
                tokens += len(comp)
                eos_hits += int(eos is not None and len(comp) > 0 and comp[-1] == eos)
                text = tokenizer.decode(comp, skip_special_tokens=True)
                ok = None
                if examples[i].answer is not None:
                    ok = is_correct(text, examples[i].answer)
                    answered += 1
                    correct += int(ok)
                if len(samples) < n_samples:
                    samples.append(
                        {
                            "prompt": examples[i].prompt,
                            "answer": examples[i].answer,
                            "response": text,
                            "correct": ok,
                        }
                    )
        pending = current

    n = max(1, len(examples))
    total = sums["head"] + sums["tail"]
    metrics = {
        "eval/kl": total / max(1, counts["head"] + counts["tail"]),
        "eval/kl_head": sums["head"] / max(1, counts["head"]),
        "eval/response_tokens": tokens / n,
        "eval/eos_rate": eos_hits / n,
        "eval/prompts": float(len(examples)),
        "eval/seconds": time.perf_counter() - t0,
    }
    if counts["tail"]:  # absent when every answer ended within the head
        metrics["eval/kl_tail"] = sums["tail"] / counts["tail"]
    if answered:
        metrics["eval/accuracy"] = correct / answered
    return EvalResult(metrics, samples)
