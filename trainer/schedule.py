"""Schedules as pure functions of the step: the prefix length L of each rollout, and the learning rate.

Steps are 0-based: step 0 is the first optimizer step, step `total_steps - 1` the last. Every schedule's L lies
in [1, max_new_tokens].
"""

from __future__ import annotations

import math

from trainer.config import PrefixConfig


def prefix_length(p: PrefixConfig, step: int, total_steps: int, max_new_tokens: int) -> int:
    """Tokens a rollout may generate at `step`.

    - full:     max_new_tokens (plain on-policy distillation, the baseline);
    - constant: p.length;
    - linear:   p.start at step 0 to p.end at the last step, rounded to the nearest token;
    - step:     p.stages equal stretches of the run, L rising from p.start to p.end in equal increments.
    """
    assert 0 <= step < total_steps, f"step {step} outside [0, {total_steps})"
    if p.schedule == "full":
        L = max_new_tokens
    elif p.schedule == "constant":
        L = p.length
    elif p.schedule == "linear":
        frac = step / (total_steps - 1) if total_steps > 1 else 1.0
        L = math.floor(p.start + (p.end - p.start) * frac + 0.5)
    elif p.schedule == "step":
        stage = min(p.stages - 1, step * p.stages // total_steps)
        L = math.floor(p.start + (p.end - p.start) * stage / (p.stages - 1) + 0.5)
    else:
        raise ValueError(f"`prefix.schedule` must be full, constant, linear or step, got {p.schedule!r}.")
    return max(1, min(max_new_tokens, L))


def learning_rate(
    step: int, total_steps: int, *, peak: float, warmup_steps: int = 0, kind: str = "constant"
) -> float:
    """Learning rate at `step`: linear warm-up over `warmup_steps` (from peak/warmup), then `kind`.

    constant keeps the peak; cosine and linear decay from the peak at the end of warm-up towards 0 at
    `total_steps` (the last step still gets a positive rate).
    """
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if kind == "constant":
        return peak
    span = max(1, total_steps - warmup_steps)
    frac = (step - warmup_steps) / span
    if kind == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * frac))
    if kind == "linear":
        return peak * (1.0 - frac)
    raise ValueError(f"`lr_schedule` must be constant, cosine or linear, got {kind!r}.")
