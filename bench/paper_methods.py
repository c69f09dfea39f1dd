"""The methods of the paper table, as trainer config overrides: one place for what each name means.

Every method starts from the same warmed-up student of the task, with the same prompts, optimizer and number of
steps (COMMON); only the rollouts, the prefix schedule and the loss differ:

    full              on-policy distillation over the whole answer (exact reverse KL, full rows)
    prefix-L<n>       the same on the first n tokens of each rollout only
    prefix-L<n>+head  ... training only the final norm and output layer (the embeddings and decoder layers
                      frozen): zero extra FLOPs
    prefix-L<n>+l2    ... plus an L2 pull toward the starting weights (anchor.l2 = 20 / n): zero extra FLOPs
    linear-<a>-<b>    a prefix growing linearly from a to b tokens over the run
    offpolicy-L<n>    teacher-written prefixes of n tokens, same loss (the paper's ablation)
    seqkd             supervised training on the teacher's own full answers (sampled at temperature 1)
    sft-gold          supervised training on the task's gold answers (one valid answer per prompt)
"""

from __future__ import annotations

COMMON = [
    "steps=150",
    "batch_size=32",
    "samples_per_prompt=1",
    "micro_batch_size=32",
    "lr=3e-4",
    "lr_schedule=constant",
    "warmup_steps=0",
    "weight_decay=0.0",
    "grad_clip=1.0",
    "loss=reverse_kl_full",
    "max_new_tokens=120",
    "temperature=1.0",
    "eval.every=50",
    "eval.prompts=250",
    "eval.max_new_tokens=120",
    "eval.batch_size=125",
    "eval.head_tokens=16",
    "eval.samples=2",
    "save_every=0",
    "tensorboard=false",
    "progress_bar=false",
]
"""Settings every run shares: 150 steps of 32 rollouts, Adam at 3e-4, answers of up to 120 tokens."""

FREEZE_TRUNK = "freeze=[model.embed_tokens,model.layers]"
"""Train the final norm and the output layer only (the decoder layers and the embeddings stay as they were)."""


def prefix(n: int, *extra: str) -> list[str]:
    return ["prefix.schedule=constant", f"prefix.length={n}", *extra]


METHODS: dict[str, list[str]] = {
    "full": ["prefix.schedule=full"],
    "prefix-L2": prefix(2),
    "prefix-L8": prefix(8),
    "prefix-L16": prefix(16),
    "prefix-L2+head": prefix(2, FREEZE_TRUNK),
    "prefix-L8+head": prefix(8, FREEZE_TRUNK),
    "prefix-L2+l2": prefix(2, "anchor.l2=10"),
    "linear-4-120": ["prefix.schedule=linear", "prefix.start=4", "prefix.end=120"],
    "offpolicy-L16": prefix(16, "rollouts.source=teacher"),
    "seqkd": ["prefix.schedule=full", "rollouts.source=teacher", "loss=nll"],
    "sft-gold": ["prefix.schedule=full", "rollouts.source=gold", "loss=nll"],
}
"""Method name -> its overrides of COMMON."""

PREFIX_METHODS = [m for m in METHODS if m.startswith(("prefix-", "linear-"))]
"""The methods that train on student prefixes (candidates for 'the best prefix method')."""


def methods_for(task: str) -> dict[str, list[str]]:
    """The methods run on `task` (the same on both tasks, so the tables compare)."""
    return dict(METHODS)
