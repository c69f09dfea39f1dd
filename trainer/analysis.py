"""The paper's two motivating analyses, through the teacher service: teacher-prefix rescue and KL by position.

- **Rescue**: the teacher writes the first L tokens of each answer (greedy), the student continues (greedy), and
  the answer is checked. If the student's accuracy rises steeply with a short teacher prefix, the first tokens
  decide the answer and a prefix carries most of the learning signal (the paper's argument for prefix OPD).
- **KL by position**: the exact per-token reverse KL(student || teacher) over full rows at each position of the
  student's own sampled answers (what on-policy training sees), averaged over prompts; and the share of the
  total KL that falls within the first L positions.

The teacher is only asked to score (the service has no generation endpoint): its greedy prefix is built one
token at a time, each request scoring the prefix so far plus one placeholder token and reading the teacher's
top-1 at the placeholder's position. The benchmark (bench/paper_table.py) and the analysis endpoints use these
functions; they hold no state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from services.teacher.types import ScoreRequest
from trainer.losses import Need, reverse_kl_full
from trainer.sampling import Rollouts, generate, pad_id_of, student_logprobs
from trainer.tasks import Example
from trainer.teacher_io import TeacherIO, build_requests, to_teacher_batch


def teacher_greedy(
    teacher: TeacherIO, prompts: Sequence[Sequence[int]], length: int, *, job_id: str, eos_id: int | None
) -> list[list[int]]:
    """The teacher's greedy continuation of each prompt, `length` tokens at most (ending early at EOS)."""
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    placeholder = 0
    for _ in range(length):
        if not live:
            break
        requests = [
            ScoreRequest(
                prompt_token_ids=np.asarray(prompts[i], dtype=np.int64),
                completion_token_ids=np.asarray([*out[i], placeholder], dtype=np.int64),
                job_id=job_id,
                top_k=1,
            )
            for i in live
        ]
        results = teacher.score(requests)
        for i, res in zip(live, results, strict=True):
            out[i].append(int(res.top_k_ids[-1, 0]))  # the teacher's top-1 after the prefix so far
        live = [i for i in live if out[i][-1] != eos_id]
    return out


@dataclass
class RescueResult:
    accuracy: dict[int, float]
    """Prefix length L -> the student's held-out accuracy when continuing a teacher-written prefix of L tokens."""
    examples: dict[int, list[dict]] = field(default_factory=dict)
    """L -> a few (prompt, teacher prefix, student continuation, correct) records."""


def rescue_curve(
    student,
    tokenizer,
    examples: Sequence[Example],
    prompt_ids: Sequence[Sequence[int]],
    teacher: TeacherIO,
    lengths: Sequence[int],
    *,
    max_new_tokens: int,
    job_id: str,
    batch_size: int = 64,
    n_examples: int = 3,
) -> RescueResult:
    """Accuracy of the student finishing teacher-written prefixes of each length in `lengths` (greedy both)."""
    eos = tokenizer.eos_token_id
    longest = teacher_greedy(teacher, prompt_ids, max(lengths), job_id=job_id, eos_id=eos)
    result = RescueResult({})
    for L in lengths:
        correct, shown = 0, []
        for s in range(0, len(prompt_ids), batch_size):
            rows = range(s, min(len(prompt_ids), s + batch_size))
            prefixes = [longest[i][:L] for i in rows]
            continuations = _continue(
                student, tokenizer, [prompt_ids[i] for i in rows], prefixes, max_new_tokens
            )
            for i, prefix, cont in zip(rows, prefixes, continuations, strict=True):
                text = tokenizer.decode(prefix + cont, skip_special_tokens=True)
                ok = examples[i].is_correct(text)
                correct += int(ok)
                if len(shown) < n_examples:
                    shown.append(
                        {
                            "prompt": examples[i].prompt,
                            "teacher_prefix": tokenizer.decode(prefix, skip_special_tokens=True),
                            "student": tokenizer.decode(cont, skip_special_tokens=True),
                            "correct": ok,
                        }
                    )
        result.accuracy[L] = correct / max(1, len(prompt_ids))
        result.examples[L] = shown
    return result


def _continue(student, tokenizer, prompts, prefixes, max_new_tokens: int) -> list[list[int]]:
    """The student's greedy continuation after prompt + prefix, up to `max_new_tokens` answer tokens in all."""
    eos = tokenizer.eos_token_id
    out: list[list[int]] = [[] for _ in prompts]
    todo = [j for j, p in enumerate(prefixes) if (not p or p[-1] != eos) and len(p) < max_new_tokens]
    # rows with prefixes of equal length go together (a teacher prefix may end early at EOS)
    for n in sorted({len(prefixes[j]) for j in todo}):
        rows = [j for j in todo if len(prefixes[j]) == n]
        ro = generate(
            student,
            [list(prompts[j]) + list(prefixes[j]) for j in rows],
            max_new_tokens - n,
            eos_id=eos,
            pad_id=pad_id_of(tokenizer),
            temperature=0.0,
        )
        for k, j in enumerate(rows):
            out[j] = ro.completion(k)
    return out


@dataclass
class PositionKL:
    mean_by_position: list[float]
    """Mean reverse KL at answer position t (over the answers that reach t)."""
    count_by_position: list[int]
    """How many answers reach position t."""

    def share_within(self, L: int) -> float:
        """Share of the total KL (summed over all answers and positions) within the first L positions."""
        sums = [m * c for m, c in zip(self.mean_by_position, self.count_by_position, strict=True)]
        total = sum(sums)
        return sum(sums[:L]) / total if total > 0 else 0.0


@torch.no_grad()
def kl_by_position(
    student,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    teacher: TeacherIO,
    *,
    max_new_tokens: int,
    vocab: int,
    job_id: str,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> PositionKL:
    """Exact per-position KL(student || teacher) on the student's own sampled answers (full teacher rows)."""
    eos, pad = tokenizer.eos_token_id, pad_id_of(tokenizer)
    sums, counts = np.zeros(max_new_tokens), np.zeros(max_new_tokens, dtype=np.int64)
    gen = torch.Generator().manual_seed(seed)
    device = next(student.parameters()).device
    for s in range(0, len(prompt_ids), batch_size):
        ro: Rollouts = generate(
            student,
            [list(p) for p in prompt_ids[s : s + batch_size]],
            max_new_tokens,
            eos_id=eos,
            pad_id=pad,
            temperature=temperature,
            generator=gen,
        )
        reqs = build_requests(ro, need=Need.FULL, job_id=job_id, top_k=0, temperature=1.0)
        tb = to_teacher_batch(teacher.score(reqs), ro.ids_BT.shape[1], device, Need.FULL, vocab)
        s_lp_BTV = student_logprobs(student, ro)
        mask_BT = ro.mask_BT.to(device)
        kl_BT = reverse_kl_full(s_lp_BTV, tb.full_lp_BTV, mask_BT, reduction="none")
        T = kl_BT.shape[1]
        sums[:T] += kl_BT.sum(0).cpu().numpy()
        counts[:T] += mask_BT.sum(0).long().cpu().numpy()
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return PositionKL(mean.tolist(), counts.tolist())
