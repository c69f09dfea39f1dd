"""FLOP accounting of a distillation step: student sampling, student training and teacher scoring. Pure.

The model of a decoder-only transformer (Kaplan et al. 2020, Table 1, with the attention-value product
counted as well, as in Chinchilla's appendix F):

    forward FLOPs of n tokens at absolute positions c+1 .. c+n (c tokens already in the KV cache), with
    logits computed for g of them:

        F(n, c, g) = 2 * N_layers * n                       parameter term of the decoder layers
                   + 2 * N_head * g                         the LM head (vocab x d_model) on g positions
                   + 4 * n_layer * d_attn * sum_{p=c+1}^{c+n} p     attention: QK^T and AV, each 2 * p * d_attn
                                                             for a query at position p attending p keys

    N_layers counts the weight matrices of the decoder layers (embeddings, norms and biases excluded:
    a lookup and elementwise work are not matrix FLOPs); d_attn = heads x head_dim is the query width.
    Grouped-query attention is covered because N_layers counts the real (smaller) K/V projections.

Per rollout with a P-token prompt and a C-token completion, of which the sampler generated G (G = C, or 0 for
a gold answer), the teacher scored the first S (S <= C; 0 when the loss needs nothing from the teacher), the
student trained on all C, and the reference forward covered R (R = C for a rollout whose tail is anchored to
the reference policy, else 0):
    sampling  = F_sampler(P, 0, 1) + sum_{j=1}^{G-1} F_sampler(1, P + j - 1, 1)
                                                  prefill, then one cached step per token after the first (the last
                                                  token is never fed); F_sampler with the sampling model's dims
                                                  (the student's on-policy, the teacher's for teacher rollouts)
    training  = 3 * F(P + C, 0, C)                forward + backward (backward = 2 x forward)
              + F(P + R, 0, R)                    the reference's forward (the starting student: student dims;
                                                  no backward), counted under training
    teacher   = F_teacher(P + S, 0, S)            one scoring forward pass over the scored positions, charged in
                                                  full whatever the teacher's cache did
    teacher_saved = F_teacher(P + S, 0, S) - F_teacher(P + S - K, K, S)
                                                  what the teacher's prompt reuse saved, K prompt tokens having had
                                                  their keys/values reused (reported per request): a separate
                                                  figure, never subtracted from the total, because it depends on
                                                  what else the shared teacher served before (run order, other jobs)
Frozen parameters (config `freeze`) are still counted at 3 x forward: their weight gradients are skipped, but
the backward still propagates through them to earlier trained layers, so 3 x forward is an upper bound.

Counts are ideal per sequence: padding inside a batch and rows that keep running after their EOS are not
counted, because they depend on batching, not on the method being compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """What the FLOP formula needs to know about a model."""

    n_layer: int
    """Decoder layers."""
    d_attn: int
    """Query width: attention heads x head dimension."""
    layer_params: int
    """Weight-matrix parameters of all decoder layers (N_layers)."""
    head_params: int
    """LM head parameters: vocab x d_model (N_head)."""

    def __post_init__(self) -> None:
        assert min(self.n_layer, self.d_attn, self.layer_params, self.head_params) > 0, f"bad dims {self}"


def dims_from_model(model) -> ModelDims:
    """ModelDims of a transformers causal LM, counting its layers' matrix parameters (no I/O)."""
    from services.models.dims import flop_dims

    return ModelDims(**flop_dims(model))


def forward_flops(d: ModelDims, n_tokens: int, n_cached: int = 0, n_logits: int | None = None) -> int:
    """F(n, c, g) of the module docstring: `n_tokens` new tokens after `n_cached`, logits on `n_logits`."""
    assert n_tokens >= 0 and n_cached >= 0
    g = n_tokens if n_logits is None else n_logits
    pos_sum = n_tokens * (2 * n_cached + n_tokens + 1) // 2  # sum of positions c+1 .. c+n
    return 2 * d.layer_params * n_tokens + 2 * d.head_params * g + 4 * d.n_layer * d.d_attn * pos_sum


def sampling_flops(d: ModelDims, prompt_len: int, gen_len: int) -> int:
    """Generating `gen_len` tokens after a `prompt_len`-token prompt with a KV cache."""
    if gen_len <= 0:
        return 0
    total = forward_flops(d, prompt_len, 0, 1)
    # Decode steps: feed token j (position P + j) to get token j + 1, for j = 1 .. G - 1.
    n = gen_len - 1
    # sum over j of F(1, P + j - 1, 1): parameter terms n times, attention positions P+1 .. P+n.
    total += 2 * (d.layer_params + d.head_params) * n
    total += 4 * d.n_layer * d.d_attn * (n * (2 * prompt_len + n + 1) // 2)
    return total


def training_flops(d: ModelDims, prompt_len: int, gen_len: int) -> int:
    """Forward and backward over prompt + completion, loss on the completion positions."""
    if gen_len <= 0:
        return 0
    return 3 * forward_flops(d, prompt_len + gen_len, 0, gen_len)


def teacher_flops(d: ModelDims, prompt_len: int, gen_len: int, reused: int = 0) -> int:
    """One teacher forward pass scoring the completion positions; the first `reused` prompt tokens' keys/values
    came from the teacher's prompt reuse (not computed, attended to)."""
    if gen_len <= 0:
        return 0
    return forward_flops(d, prompt_len + gen_len - reused, reused, gen_len)


@dataclass(frozen=True)
class RolloutTokens:
    """The token counts of one rollout that its FLOPs depend on (see the module docstring)."""

    prompt: int
    """P: prompt tokens."""
    sampled: int = 0
    """G: completion tokens generated by the sampler (0 for a gold answer)."""
    scored: int = 0
    """S: completion tokens the teacher scored (0 when the loss needs nothing from the teacher)."""
    trained: int = 0
    """C: completion tokens of the training forward + backward (every one receives a loss)."""
    reference: int = 0
    """R: completion tokens of the reference policy's forward (0: none)."""
    teacher_reused: int = 0
    """K: prompt tokens whose keys/values the teacher reused rather than computed (its report; K <= P)."""

    def __post_init__(self) -> None:
        assert min(self.prompt, self.sampled, self.scored, self.trained, self.reference) >= 0, self
        assert 0 <= self.teacher_reused <= self.prompt, f"bad token counts {self}"
        assert self.scored <= self.trained and self.reference <= self.trained, f"bad token counts {self}"


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step (or a sum of steps), by component."""

    sampling: int = 0
    training: int = 0
    teacher: int = 0
    teacher_saved: int = 0
    """What the teacher's prompt reuse saved of `teacher` (not subtracted: the ledger is the same whatever the
    teacher served before)."""

    @property
    def total(self) -> int:
        return self.sampling + self.training + self.teacher

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(
            self.sampling + other.sampling,
            self.training + other.training,
            self.teacher + other.teacher,
            self.teacher_saved + other.teacher_saved,
        )

    def as_metrics(self, namespace: str = "flops/") -> dict[str, float]:
        """The counts as metrics named `namespace` + component (e.g. flops/sampling, flops/cum_total)."""
        return {
            f"{namespace}sampling": float(self.sampling),
            f"{namespace}training": float(self.training),
            f"{namespace}teacher": float(self.teacher),
            f"{namespace}teacher_saved": float(self.teacher_saved),
            f"{namespace}total": float(self.total),
        }


def rollout_flops(
    r: RolloutTokens, *, student: ModelDims, teacher: ModelDims | None, sampler: ModelDims | None
) -> StepFlops:
    """FLOPs of one rollout; the teacher's (or sampler's) part is 0 when its dims are None (unknown or none)."""
    sampling = 0 if sampler is None else sampling_flops(sampler, r.prompt, r.sampled)
    training = training_flops(student, r.prompt, r.trained)
    if r.reference:
        training += forward_flops(student, r.prompt + r.reference, 0, r.reference)
    if teacher is None:
        return StepFlops(sampling, training)
    scoring = teacher_flops(teacher, r.prompt, r.scored)
    saved = scoring - teacher_flops(teacher, r.prompt, r.scored, r.teacher_reused)
    return StepFlops(sampling, training, scoring, saved)


def step_flops(
    rollouts: Sequence[RolloutTokens],
    *,
    student: ModelDims,
    teacher: ModelDims | None,
    sampler: ModelDims | None,
) -> StepFlops:
    """FLOPs of a step's rollouts: the sum of `rollout_flops` over them."""
    total = StepFlops()
    for r in rollouts:
        total = total + rollout_flops(r, student=student, teacher=teacher, sampler=sampler)
    return total
