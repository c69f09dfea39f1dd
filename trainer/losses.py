"""Distillation losses: pure functions over tensors, masked to the trained positions, with a `reduction`.

Notation: B rollouts, T completion positions (the prefix, EOS included), V vocabulary, K teacher top-k,
C candidate ids per position (the student's own top-C).
`mask_BT` is 1.0 where a position is trained (a generated token up to and including EOS) and 0.0 on padding.
All log-probabilities are natural-log, normalised over the vocabulary (the teacher's as returned by the
service, the student's from `log_softmax` of its logits).

Reductions: "mean" averages over trained tokens (sum / number of trained tokens), "sum" adds them, "none"
returns the masked per-token losses (B, T).

- `reverse_kl_sampled`: KL(student || teacher) through the sampled token only, in policy-gradient form. With
  x ~ student, advantage A = log p_T(x) - log p_S(x) (no gradient through A) and loss -A * log p_S(x), the
  expected gradient is E_x[(log p_S(x) - log p_T(x)) grad log p_S(x)] = grad KL(p_S || p_T), because
  E_x[grad log p_S(x)] = 0. Per token, each position's context taken as given (no credit to later positions).
- `*_topk`: the distributions are reduced to K + 1 buckets: the teacher's top-k tokens and one tail bucket
  holding the remaining mass of each side. Bucketing can only lose information, so the bucketed KL is <= the
  exact KL, with equality when K = V (then there is no tail).
- `reverse_kl_candidates`: the same bucketing over the *student's* top-C ids, the teacher's log-probabilities at
  exactly those ids coming from the service (normalized over its whole vocabulary). Reverse KL is an expectation
  under the student, so its support is the one that matters: `reverse_kl_topk` leaves the student's mass outside
  the teacher's top-k free except through one tail bucket, here the student's likely tokens are each matched.
  Also a lower bound of the exact reverse KL, equal to it when C = V.
- `reverse_kl_candidates_topk`: the bucketing over the union of both supports, the student's top-C and the
  teacher's top-k (one request asks for both): neither side's likely tokens hide in the tail.
- `jsd_topk`: generalized JSD(beta) of TRL's GKD: beta * KL(T || M) + (1 - beta) * KL(S || M) with
  M = beta * T + (1 - beta) * S; beta = 0 is forward KL(T || S), beta = 1 reverse KL(S || T).
- `*_full`: exact KL over the full vocabulary rows.
- `nll`: supervised cross-entropy -log p_S(x) of the rollout tokens; it reads nothing from the teacher, so with
  it the trainer sends the teacher no training requests (SeqKD on teacher-written rollouts, supervised training
  on gold answers).

`LOSSES` at the end is the one table of the config's `loss` choices: each row names what the loss needs from
the teacher (`Need`: nothing, the sampled token's log-probability, the top-k, the candidates, or full rows) and
a small adapter from `LossInputs` to its pure function. A new loss is one row (plus a `LossInputs` field or a `Need` if it reads
something new); the config, the requests and the evaluation read the table.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
# log of the smallest tail mass we represent: a teacher tail that rounds to <= 0 in float32 is floored here,
# so a student tail > 0 gives a large but finite reverse KL instead of inf.
_LOG_TINY = math.log(1e-12)


def masked_reduce(loss_BT: torch.Tensor, mask_BT: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Applies `mask_BT` (1 = trained) to per-token losses (B, T) and reduces them."""
    assert loss_BT.shape == mask_BT.shape, f"loss {tuple(loss_BT.shape)} vs mask {tuple(mask_BT.shape)}"
    mask_BT = mask_BT.to(loss_BT.dtype)
    loss_BT = torch.where(mask_BT > 0, loss_BT, torch.zeros_like(loss_BT)) * mask_BT
    if reduction == "none":
        return loss_BT
    if reduction == "sum":
        return loss_BT.sum()
    if reduction == "mean":
        return loss_BT.sum() / mask_BT.sum().clamp(min=1.0)
    raise ValueError(f"`reduction` must be one of {list(REDUCTIONS)}, got {reduction!r}.")


def _neutral_where_masked(t_lp: torch.Tensor, s_lp: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """The teacher's values with masked positions replaced by the (detached) student's: those positions then
    have a finite, zero loss whatever the padding held, so no inf * 0 can turn a gradient into NaN."""
    keep = (mask_BT > 0).reshape(mask_BT.shape + (1,) * (t_lp.dim() - mask_BT.dim()))
    return torch.where(keep, t_lp.to(s_lp.dtype), s_lp.detach())


def kl_divergence(p_lp: torch.Tensor, q_lp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_i p_i (log p_i - log q_i) over the last dim, from log-probabilities (..., N) -> (...).

    Terms with p_i = 0 are 0 (also when q_i = 0), and stay NaN-free in the backward pass.
    """
    p = p_lp.exp()
    live = p > 0
    zeros = torch.zeros((), dtype=p_lp.dtype, device=p_lp.device)
    diff = torch.where(live, p_lp, zeros) - torch.where(live, q_lp, zeros)
    return (p * diff).sum(-1)


def generalized_jsd(s_lp: torch.Tensor, t_lp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD(beta) between student and teacher log-probabilities over the last dim (..., N) -> (...)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"`beta` must be in [0, 1], got {beta}.")
    if beta == 0.0:
        return kl_divergence(t_lp, s_lp)
    if beta == 1.0:
        return kl_divergence(s_lp, t_lp)
    m_lp = torch.logsumexp(torch.stack([s_lp + math.log(1.0 - beta), t_lp + math.log(beta)]), dim=0)
    return beta * kl_divergence(t_lp, m_lp) + (1.0 - beta) * kl_divergence(s_lp, m_lp)


def bucket_topk(
    student_lp_BTV: torch.Tensor,
    topk_ids_BTK: torch.Tensor,
    teacher_topk_lp_BTK: torch.Tensor,
    repeat_BTK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions over K distinct ids per position (the teacher's top-k, or the student's top-C
    candidates) plus a tail bucket: (B, T, K+1) each (K if K = V).

    The student's tail is the log-sum-exp of its log-probabilities outside the ids (exact, with gradient); the
    teacher's tail is log(1 - sum of its probabilities at the ids), floored at 1e-12. `repeat_BTK` (bool) marks
    ids that repeat an earlier one of the same position: their bucket gets no mass on either side (a zero term of
    the KL), so a union of two id lists counts each id once.
    """
    K, V = topk_ids_BTK.shape[-1], student_lp_BTV.shape[-1]
    ids = topk_ids_BTK.long()
    s_topk_BTK = student_lp_BTV.gather(-1, ids)
    t_topk_BTK = teacher_topk_lp_BTK.to(student_lp_BTV.dtype)
    if repeat_BTK is not None:
        s_topk_BTK = s_topk_BTK.masked_fill(repeat_BTK, -math.inf)
        t_topk_BTK = t_topk_BTK.masked_fill(repeat_BTK, -math.inf)
    if K >= V and repeat_BTK is None:  # every id named once: no tail
        return s_topk_BTK, t_topk_BTK
    in_topk_BTV = torch.zeros_like(student_lp_BTV, dtype=torch.bool).scatter_(-1, ids, True)
    fill = torch.finfo(student_lp_BTV.dtype).min
    s_tail_BT = torch.logsumexp(student_lp_BTV.masked_fill(in_topk_BTV, fill), dim=-1)
    t_mass_BT = torch.logsumexp(t_topk_BTK, dim=-1).clamp(max=0.0)
    t_tail_BT = torch.log(-torch.expm1(t_mass_BT)).clamp(min=_LOG_TINY)
    s_BTK1 = torch.cat([s_topk_BTK, s_tail_BT.unsqueeze(-1)], dim=-1)
    t_BTK1 = torch.cat([t_topk_BTK, t_tail_BT.unsqueeze(-1)], dim=-1)
    return s_BTK1, t_BTK1


def reverse_kl_sampled(
    student_token_lp_BT: torch.Tensor,
    teacher_token_lp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Policy-gradient surrogate of KL(student || teacher) on sampled tokens (B, T).

    The value is -A * log p_S(x) with A = (log p_T(x) - log p_S(x)).detach(): its gradient, not its value, is
    the point (see the module docstring). The Monte-Carlo KL estimate itself is `sampled_kl_estimate`.
    """
    teacher_token_lp_BT = _neutral_where_masked(teacher_token_lp_BT, student_token_lp_BT, mask_BT)
    advantage_BT = (teacher_token_lp_BT - student_token_lp_BT).detach()
    return masked_reduce(-advantage_BT * student_token_lp_BT, mask_BT, reduction)


def nll(student_token_lp_BT: torch.Tensor, mask_BT: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the rollout tokens (B, T): -log p_S(x) at every trained position."""
    return masked_reduce(-student_token_lp_BT, mask_BT, reduction)


def sampled_kl_estimate(
    student_token_lp_BT: torch.Tensor,
    teacher_token_lp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Unbiased Monte-Carlo estimate of the per-token reverse KL: log p_S(x) - log p_T(x) for x ~ student."""
    return masked_reduce(
        student_token_lp_BT - teacher_token_lp_BT.to(student_token_lp_BT.dtype), mask_BT, reduction
    )


def reverse_kl_topk(student_lp_BTV, topk_ids_BTK, teacher_topk_lp_BTK, mask_BT, reduction="mean"):
    """KL(student || teacher) over the teacher's top-k plus a tail bucket: `jsd_topk` at beta = 1.

    Shapes: student (B, T, V), top-k ids and teacher log-probabilities (B, T, K), mask (B, T)."""
    return jsd_topk(student_lp_BTV, topk_ids_BTK, teacher_topk_lp_BTK, mask_BT, 1.0, reduction)


def forward_kl_topk(student_lp_BTV, topk_ids_BTK, teacher_topk_lp_BTK, mask_BT, reduction="mean"):
    """KL(teacher || student) over the teacher's top-k plus a tail bucket: `jsd_topk` at beta = 0.

    Shapes: student (B, T, V), top-k ids and teacher log-probabilities (B, T, K), mask (B, T)."""
    return jsd_topk(student_lp_BTV, topk_ids_BTK, teacher_topk_lp_BTK, mask_BT, 0.0, reduction)


def jsd_topk(student_lp_BTV, topk_ids_BTK, teacher_topk_lp_BTK, mask_BT, beta=0.5, reduction="mean"):
    """Generalized JSD(beta) over the teacher's top-k plus a tail bucket.

    Shapes: student (B, T, V), top-k ids and teacher log-probabilities (B, T, K), mask (B, T)."""
    s, t = bucket_topk(student_lp_BTV, topk_ids_BTK, teacher_topk_lp_BTK)
    t = _neutral_where_masked(t, s, mask_BT)
    return masked_reduce(generalized_jsd(s, t, beta), mask_BT, reduction)


def reverse_kl_candidates(student_lp_BTV, cand_ids_BTC, teacher_cand_lp_BTC, mask_BT, reduction="mean"):
    """KL(student || teacher) over C candidate ids per position (the student's top-C) plus a tail bucket.

    Shapes: student (B, T, V), candidate ids (B, T, C), distinct within a position, and the teacher's
    log-probabilities at them (B, T, C), normalized over the teacher's whole vocabulary; mask (B, T)."""
    s, t = bucket_topk(student_lp_BTV, cand_ids_BTC, teacher_cand_lp_BTC)  # (B, T, C+1) each
    t = _neutral_where_masked(t, s, mask_BT)
    return masked_reduce(kl_divergence(s, t), mask_BT, reduction)


def reverse_kl_candidates_topk(
    student_lp_BTV,
    cand_ids_BTC,
    teacher_cand_lp_BTC,
    topk_ids_BTK,
    teacher_topk_lp_BTK,
    mask_BT,
    reduction="mean",
):
    """KL(student || teacher) over the union of the student's top-C and the teacher's top-k ids plus a tail
    bucket: each side's likely tokens matched by name, so neither's mass hides in the tail.

    Shapes: candidate ids and the teacher's log-probabilities at them (B, T, C), the teacher's top-k (B, T, K),
    student (B, T, V), mask (B, T). A top-k id that is also a candidate counts once."""
    cand_BTC, topk_BTK = cand_ids_BTC.long(), topk_ids_BTK.long()
    repeat_BTK = (topk_BTK.unsqueeze(-1) == cand_BTC.unsqueeze(-2)).any(-1)
    ids_BTU = torch.cat([cand_BTC, topk_BTK], dim=-1)  # U = C + K
    lp_BTU = torch.cat([teacher_cand_lp_BTC, teacher_topk_lp_BTK.to(teacher_cand_lp_BTC.dtype)], dim=-1)
    repeat_BTU = torch.cat([torch.zeros_like(cand_ids_BTC, dtype=torch.bool), repeat_BTK], dim=-1)
    s, t = bucket_topk(student_lp_BTV, ids_BTU, lp_BTU, repeat_BTU)  # (B, T, U+1) each
    t = _neutral_where_masked(t, s, mask_BT)
    return masked_reduce(kl_divergence(s, t), mask_BT, reduction)


def reverse_kl_full(student_lp_BTV, teacher_lp_BTV, mask_BT, reduction="mean"):
    """Exact KL(student || teacher) over full vocabulary rows (B, T, V); mask (B, T)."""
    t = _neutral_where_masked(teacher_lp_BTV, student_lp_BTV, mask_BT)
    return masked_reduce(kl_divergence(student_lp_BTV, t), mask_BT, reduction)


def forward_kl_full(student_lp_BTV, teacher_lp_BTV, mask_BT, reduction="mean"):
    """Exact KL(teacher || student) over full vocabulary rows (B, T, V); mask (B, T)."""
    t = _neutral_where_masked(teacher_lp_BTV, student_lp_BTV, mask_BT)
    return masked_reduce(kl_divergence(t, student_lp_BTV), mask_BT, reduction)


@dataclass
class TeacherBatch:
    """The teacher's scores of a micro-batch, padded to (B, T[, K | V]) on the student's device."""

    token_lp_BT: torch.Tensor
    """(B, T) the teacher's log-probability of each sampled token (present whenever the teacher scored)."""
    topk_ids_BTK: torch.Tensor | None = None
    """(B, T, K) the teacher's top-k token ids (Need.TOPK)."""
    topk_lp_BTK: torch.Tensor | None = None
    """(B, T, K) their log-probabilities (Need.TOPK)."""
    full_lp_BTV: torch.Tensor | None = None
    """(B, T, V) full vocabulary rows (Need.FULL)."""
    cand_ids_BTC: torch.Tensor | None = None
    """(B, T, C) the candidate ids the teacher was asked about: the student's top-C (Need.CANDIDATES)."""
    cand_lp_BTC: torch.Tensor | None = None
    """(B, T, C) the teacher's log-probabilities at them (Need.CANDIDATES)."""


class Need(str, enum.Enum):
    """What a loss needs from the teacher at each scored position (it sets what the requests ask for)."""

    NONE = "none"
    """Nothing: the loss does not read the teacher, and training sends it no requests."""
    TOKEN = "token"
    """The log-probability of the sampled token only (every request returns it)."""
    TOPK = "topk"
    """Also the teacher's top-k ids and log-probabilities (`top_k` of the config)."""
    FULL = "full"
    """Also the whole vocabulary row (within the teacher's memory guard)."""
    CANDIDATES = "candidates"
    """Also the teacher's log-probabilities at the student's top-C ids (`candidates` of the config)."""
    CANDIDATES_TOPK = "candidates_topk"
    """Both: the teacher's log-probabilities at the student's top-C ids and the teacher's own top-k."""

    @property
    def asks_topk(self) -> bool:
        """Whether requests ask for the teacher's top-k."""
        return self in (Need.TOPK, Need.CANDIDATES_TOPK)

    @property
    def asks_candidates(self) -> bool:
        """Whether requests name the student's candidate ids."""
        return self in (Need.CANDIDATES, Need.CANDIDATES_TOPK)


@dataclass(frozen=True)
class LossInputs:
    """Everything a loss of the table may read; a new kind of loss adds a field here and a row below."""

    student_lp_BTV: torch.Tensor
    """(B, T, V) the student's log-probabilities at the rollout positions, with gradient."""
    sampled_ids_BT: torch.Tensor
    """(B, T) int64 the sampled token ids."""
    teacher: TeacherBatch | None
    """The teacher's scores (None when the loss needs nothing from the teacher)."""
    mask_BT: torch.Tensor
    """(B, T) 1.0 where a position is trained."""
    beta: float = 0.5
    """beta of the generalized JSD (config `jsd_beta`)."""

    @property
    def student_token_lp_BT(self) -> torch.Tensor:
        """(B, T) the student's log-probability of each sampled token."""
        return self.student_lp_BTV.gather(-1, self.sampled_ids_BT.unsqueeze(-1)).squeeze(-1)

    def token(self) -> torch.Tensor:
        """(B, T) the teacher's log-probability of each sampled token."""
        assert self.teacher is not None, "this loss needs the teacher's scores"
        return self.teacher.token_lp_BT

    def topk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, T, K), log-probabilities (B, T, K)) of the teacher's top-k."""
        t = self.teacher
        assert t is not None and t.topk_ids_BTK is not None and t.topk_lp_BTK is not None, (
            "this loss needs the teacher's top-k"
        )
        return t.topk_ids_BTK, t.topk_lp_BTK

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, T, C), the teacher's log-probabilities (B, T, C)) at the student's top-C candidates."""
        t = self.teacher
        assert t is not None and t.cand_ids_BTC is not None and t.cand_lp_BTC is not None, (
            "this loss needs the teacher's log-probabilities at the candidates"
        )
        return t.cand_ids_BTC, t.cand_lp_BTC

    def full(self) -> torch.Tensor:
        """(B, T, V) the teacher's full rows."""
        assert self.teacher is not None and self.teacher.full_lp_BTV is not None, "this loss needs full rows"
        return self.teacher.full_lp_BTV


@dataclass(frozen=True)
class Loss:
    """One row of the loss table: what the loss needs from the teacher and how it is computed."""

    need: Need
    fn: Callable[[LossInputs, str], torch.Tensor]
    """(inputs, reduction) -> the reduced loss; a thin adapter over one of the pure functions above."""
    help: str
    """A few words for the configuration reference (reverse KL is KL(student || teacher))."""


# The loss table: the config's `loss` choices, what each asks of the teacher, and how it is computed.
LOSSES: dict[str, Loss] = {
    "reverse_kl_sampled": Loss(
        Need.TOKEN,
        lambda x, r: reverse_kl_sampled(x.student_token_lp_BT, x.token(), x.mask_BT, r),
        "reverse KL through the sampled tokens (policy-gradient form)",
    ),
    "reverse_kl_topk": Loss(
        Need.TOPK,
        lambda x, r: reverse_kl_topk(x.student_lp_BTV, *x.topk(), x.mask_BT, r),
        "reverse KL over the teacher's top-k plus a tail bucket",
    ),
    "forward_kl_topk": Loss(
        Need.TOPK,
        lambda x, r: forward_kl_topk(x.student_lp_BTV, *x.topk(), x.mask_BT, r),
        "forward KL over the teacher's top-k plus a tail bucket",
    ),
    "jsd_topk": Loss(
        Need.TOPK,
        lambda x, r: jsd_topk(x.student_lp_BTV, *x.topk(), x.mask_BT, x.beta, r),
        "generalized JSD(jsd_beta) over the top-k plus a tail bucket",
    ),
    "reverse_kl_candidates": Loss(
        Need.CANDIDATES,
        lambda x, r: reverse_kl_candidates(x.student_lp_BTV, *x.candidates(), x.mask_BT, r),
        "reverse KL over the student's own top-C ids (teacher logprobs at them) plus a tail bucket",
    ),
    "reverse_kl_candidates_topk": Loss(
        Need.CANDIDATES_TOPK,
        lambda x, r: reverse_kl_candidates_topk(x.student_lp_BTV, *x.candidates(), *x.topk(), x.mask_BT, r),
        "reverse KL over the student's top-C and the teacher's top-k ids together plus a tail bucket",
    ),
    "reverse_kl_full": Loss(
        Need.FULL,
        lambda x, r: reverse_kl_full(x.student_lp_BTV, x.full(), x.mask_BT, r),
        "exact reverse KL over full vocabulary rows",
    ),
    "forward_kl_full": Loss(
        Need.FULL,
        lambda x, r: forward_kl_full(x.student_lp_BTV, x.full(), x.mask_BT, r),
        "exact forward KL over full vocabulary rows",
    ),
    "nll": Loss(
        Need.NONE,
        lambda x, r: nll(x.student_token_lp_BT, x.mask_BT, r),
        "supervised cross-entropy of the rollout tokens (SeqKD, gold answers; no teacher requests)",
    ),
}


def loss_of(name: str) -> Loss:
    """The table row of `name`; ValueError listing the known losses otherwise."""
    if name not in LOSSES:
        raise ValueError(f"`loss` must be one of {list(LOSSES)}, got {name!r}.")
    return LOSSES[name]


def compute_loss(
    name: str,
    student_lp_BTV: torch.Tensor,
    sampled_ids_BT: torch.Tensor,
    teacher: TeacherBatch | None,
    mask_BT: torch.Tensor,
    *,
    beta: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss `name` of the table, from the student's log-probabilities (B, T, V) at the rollout positions."""
    inputs = LossInputs(student_lp_BTV, sampled_ids_BT, teacher, mask_BT, beta)
    return loss_of(name).fn(inputs, reduction)
