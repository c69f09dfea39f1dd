"""Anchors toward the starting student, and which parameters train at all (config `anchor`, `freeze`).

A short prefix trains only the first L positions of every answer, and a small student can lose the skill of
writing the rest (the paper's caveat on tail quality). Three guards keep it near where it started:
  freeze          parameters whose name starts with a `freeze` prefix get no gradient and no optimizer state;
  anchor.l2       l2 x sum over trained parameters of (theta - theta0)^2 is added to each step's loss, once per
                  step: its gradient 2 l2 (theta - theta0) is added to the (already rank-averaged) gradients
                  before clipping, so every rank adds the same term and DDP's average stays exact;
  the tail anchor the positions >= L of tail rollouts (trainer.rollouts) are trained with the exact
                  KL(student || reference) over full vocabulary rows, the reference being a frozen copy of the
                  starting student, times anchor.tail_weight.
theta0 and the reference are always loaded from `student` (the starting weights), also when a run resumes from
a checkpoint whose weights have moved.
"""

from __future__ import annotations

import torch

from trainer.config import ConfigError, TrainConfig
from trainer.losses import reverse_kl_full
from trainer.sampling import Rollouts, student_logprobs


def freeze(model: torch.nn.Module, prefixes: list[str]) -> list[tuple[str, torch.nn.Parameter]]:
    """Turns off the gradient of every parameter whose name starts with one of `prefixes` (tied parameters
    answer to each of their names); returns the (name, parameter) pairs that still train."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            shown = sorted({".".join(n.split(".")[:2]) for n in names})
            raise ConfigError(
                f"`freeze` prefix {prefix!r} matches no parameter of the student; names start with {shown}."
            )
    for name, p in model.named_parameters(remove_duplicate=False):
        if any(name.startswith(prefix) for prefix in prefixes):
            p.requires_grad_(False)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trained:
        raise ConfigError(f"`freeze` {prefixes} leaves no parameter of the student to train.")
    return trained


class Anchor:
    """The L2 pull toward theta0 and the tail KL toward the reference; both off (no-ops) at their defaults."""

    def __init__(
        self,
        *,
        l2: float = 0.0,
        tail_weight: float = 1.0,
        theta0: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None,
        reference: torch.nn.Module | None = None,
    ) -> None:
        assert l2 == 0 or theta0 is not None, "the L2 anchor needs the starting weights"
        self.l2 = l2
        self.tail_weight = tail_weight
        self.theta0 = theta0 or []
        """(trained parameter, its starting value) pairs."""
        self.reference = reference
        """The frozen starting student (eval mode), when tails are anchored to it."""

    @torch.no_grad()
    def add_l2_grad(self) -> float:
        """Adds the gradient of l2 x sum (theta - theta0)^2 to the trained parameters' gradients; returns the
        term's value at the current weights (0.0 when off)."""
        if not self.l2:
            return 0.0
        total = 0.0
        for p, p0 in self.theta0:
            d = p - p0
            total += float((d * d).sum())
            if p.grad is None:
                p.grad = 2 * self.l2 * d
            else:
                p.grad.add_(d, alpha=2 * self.l2)
        return self.l2 * total

    def tail_loss(
        self, student_lp_BTV: torch.Tensor, ro: Rollouts, tail_BT: torch.Tensor, autocast_dtype=None
    ) -> torch.Tensor | None:
        """tail_weight x the sum over tail positions of KL(student || reference), with the student's gradient;
        None when the micro-batch has no tail position. The reference runs on the rows with a tail only."""
        rows = [i for i in range(tail_BT.shape[0]) if bool(tail_BT[i].any())]
        if not rows:
            return None
        assert self.reference is not None, "tail positions need the reference policy"
        sub = ro.select(rows)
        T = sub.ids_BT.shape[1]
        with torch.no_grad():
            ref_lp_BTV = student_logprobs(self.reference, sub, autocast_dtype=autocast_dtype)  # (b, T, V)
        s_lp_BTV = student_lp_BTV[rows, :T]  # (b, T, V)
        kl = reverse_kl_full(s_lp_BTV, ref_lp_BTV, tail_BT[rows, :T].to(s_lp_BTV.device), "sum")
        return self.tail_weight * kl


def build_anchor(cfg: TrainConfig, trained: list[tuple[str, torch.nn.Parameter]], device) -> Anchor:
    """The run's Anchor: the starting student is loaded from `cfg.student` when the L2 term or the tail's
    reference needs it."""
    a = cfg.anchor
    if not a.l2 and not a.uses_reference:
        return Anchor()
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32).to(device)
    start.eval().requires_grad_(False)
    initial = dict(start.named_parameters())
    theta0 = [(p, initial[name].detach()) for name, p in trained]
    return Anchor(
        l2=a.l2, tail_weight=a.tail_weight, theta0=theta0, reference=start if a.uses_reference else None
    )
