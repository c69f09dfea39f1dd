"""The paper's two motivating analyses, through the teacher service: teacher-prefix rescue and KL by position.

- **Rescue**: the teacher writes the first L tokens of each answer (greedy), the student continues (greedy), and
  the answer is checked. If the student's accuracy rises steeply with a short teacher prefix, the first tokens
  decide the answer and a prefix carries most of the learning signal (the paper's argument for prefix OPD).
- **KL by position**: the exact per-token reverse KL(student || teacher) over full rows at each position of the
  student's own sampled answers (what on-policy training sees), averaged over prompts; and the share of the
  total KL that falls within the first L positions.
- **One answer, token by token** (`compare_tokens`): teacher and student log-probabilities of each token, the exact
  reverse and forward KL from full rows, and the teacher's top alternatives (what the analysis page shows).

The teacher is only asked to score (the service has no generation endpoint): its greedy prefix is built one
token at a time, each request scoring the prefix so far plus one placeholder token and reading the teacher's
top-1 at the placeholder's position. The benchmark (bench/paper_table.py) and the analysis endpoints
(services/app/analysis_api.py: /v1/rescue, /v1/compare) use these functions; they hold no state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from services.teacher.types import ScoreRequest
from trainer.losses import Need, forward_kl_full, reverse_kl_full
from trainer.sampling import Rollouts, from_completions, generate, pad_id_of, student_logprobs
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

    def shares(self) -> list[float]:
        """`share_within(L)` for L = 1 .. the number of positions."""
        return [self.share_within(L) for L in range(1, len(self.mean_by_position) + 1)]


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


def student_answer(
    student, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float, seed: int
) -> list[int]:
    """The student's own answer to one prompt: sampled at `temperature` (0: greedy) from a seeded generator."""
    ro = generate(
        student,
        [list(prompt_ids)],
        max_new_tokens,
        eos_id=tokenizer.eos_token_id,
        pad_id=pad_id_of(tokenizer),
        temperature=temperature,
        generator=torch.Generator().manual_seed(seed),
    )
    return ro.completion(0)


@dataclass
class TokenComparison:
    """Teacher and student at each of the T positions of one completion (every list has T entries)."""

    token_ids: list[int]
    teacher_logprobs: list[float]
    """log p_T(c_t | prompt, c_<t)."""
    student_logprobs: list[float]
    """log p_S(c_t | prompt, c_<t)."""
    reverse_kl: list[float]
    """KL(student || teacher) over the full rows at position t (what on-policy distillation minimises)."""
    forward_kl: list[float]
    """KL(teacher || student) over the full rows at position t."""
    top_ids: list[list[int]]
    """The teacher's `top_k` most likely tokens at position t, most likely first."""
    top_teacher_logprobs: list[list[float]]
    top_student_logprobs: list[list[float]]
    """The student's log-probabilities of the same `top_ids`."""


@torch.no_grad()
def compare_tokens(
    student,
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    teacher: TeacherIO,
    *,
    top_k: int,
    job_id: str,
    pad_id: int,
) -> TokenComparison:
    """Scores one completion with the teacher (full rows and top-k) and the student (a forward pass)."""
    req = ScoreRequest(
        prompt_token_ids=np.asarray(prompt_ids, dtype=np.int64),
        completion_token_ids=np.asarray(completion_ids, dtype=np.int64),
        job_id=job_id,
        top_k=top_k,
        full=True,
    )
    (res,) = teacher.score([req])
    ro = from_completions([prompt_ids], [completion_ids], pad_id)
    device = next(student.parameters()).device
    s_lp_1TV = student_logprobs(student, ro)
    t_lp_1TV = torch.from_numpy(res.full_float32()).to(device)[None]
    assert s_lp_1TV.shape == t_lp_1TV.shape, (
        f"student {tuple(s_lp_1TV.shape)} vs teacher {tuple(t_lp_1TV.shape)}"
    )
    mask_1T = ro.mask_BT.to(device)
    rev_T = reverse_kl_full(s_lp_1TV, t_lp_1TV, mask_1T, reduction="none")[0]
    fwd_T = forward_kl_full(s_lp_1TV, t_lp_1TV, mask_1T, reduction="none")[0]
    ids_T1 = ro.ids_BT[0].to(device)[:, None]
    top_TK = np.zeros((len(completion_ids), 0), dtype=np.int64) if res.top_k_ids is None else res.top_k_ids
    top_lp_TK = np.zeros(top_TK.shape, dtype=np.float32) if res.top_k_logprobs is None else res.top_k_logprobs
    s_top_TK = s_lp_1TV[0].gather(1, torch.as_tensor(top_TK, dtype=torch.long, device=device))
    return TokenComparison(
        token_ids=[int(i) for i in completion_ids],
        teacher_logprobs=res.token_logprobs.tolist(),
        student_logprobs=s_lp_1TV[0].gather(1, ids_T1)[:, 0].tolist(),
        reverse_kl=rev_T.tolist(),
        forward_kl=fwd_T.tolist(),
        top_ids=top_TK.tolist(),
        top_teacher_logprobs=top_lp_TK.tolist(),
        top_student_logprobs=s_top_TK.tolist(),
    )
