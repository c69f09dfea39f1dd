"""The methods of the paper table, as trainer config overrides: one place for what each name means.

Every method starts from the same warmed-up student of the task, with the same prompts, optimizer, batch and
number of steps (COMMON); its learning rate comes from the validation sweep (bench/paper_tune.py, recorded in
bench/paper_lr.json); only the rollouts, the prefix, the loss and the trained parameters differ:

    full            on-policy distillation over the whole answer (exact reverse KL over full rows)
    prefix-L<n>     the same on the first n tokens of each rollout only
    linear          a prefix growing linearly from 2 tokens to the whole answer over the run
    offpolicy-L8    teacher-written prefixes of 8 tokens, the same loss (the paper's ablation)
    seqkd           supervised training on the teacher's own full answers (sampled at temperature 1)
    sft-gold        supervised training on the gold answers (valid, drawn without the teacher's preference)
    readout-L8      prefix-L8 training only the final norm and the output layer (the embeddings and decoder
                    frozen): can a bias of the output layer learn the decision? (it must not)
    tail-L8         prefix-L8 plus a quarter of each batch's rollouts run to full length and scored by the
                    teacher on every position (tail rollouts: full OPD on a subset)
    tailref-L8      prefix-L8 plus a quarter run to full length, their tail held to the starting student by a
                    KL term (the tail anchor; the teacher scores only the prefix)
    l2-L8           prefix-L8 plus an L2 pull toward the starting weights
    lora-full       full OPD through a rank-8 LoRA on every linear layer of the decoder (peft)
    lora-L8         prefix-L8 through the same LoRA

The trivial baselines (forced or banned tokens, the best constant tags) are not trained: bench/shortcuts.py
measures them and the report puts them in the same table.
"""

from __future__ import annotations

COMMON = [
    "steps=600",
    "batch_size=32",
    "samples_per_prompt=1",
    "micro_batch_size=32",
    "lr_schedule=constant",
    "warmup_steps=0",
    "weight_decay=0.0",
    "grad_clip=1.0",
    "loss=reverse_kl_full",
    "max_new_tokens=112",
    "temperature=1.0",
    "eval.every=50",
    "eval.light=true",
    "eval.max_new_tokens=112",
    "eval.batch_size=126",
    "eval.head_tokens=16",
    "eval.samples=2",
    "save_every=0",
    "tensorboard=false",
    "progress_bar=false",
]
"""Settings every run shares: 600 steps of 32 rollouts, AdamW at a constant rate, answers of up to 112 tokens
(both tasks' answers and EOS fit), an evaluation every 50 steps (light ones between the first and the last).

600, not 200: at 200 steps no method, full OPD included, moved route's agreement off chance on validation
(docs/results/prefix_opd.md); at 600 full OPD gains 16 points of agreement (docs/results/paper_budget.md).
Every 50, not every 10: a light evaluation costs ~6 s, so every 10 steps would double a run's cost on 2 cores;
compute to reach is read on this grid of 13 points."""


def common(name: str) -> int:
    """One integer setting of COMMON (e.g. "steps", "max_new_tokens")."""
    return int(dict(s.split("=", 1) for s in COMMON)[name])


LR_GRID = (3e-4, 1e-3, 3e-3)
"""The learning rates the validation sweep tries for every method (bench/paper_tune.py)."""

FREEZE_TRUNK = "freeze=[model.embed_tokens,model.layers]"
"""Train the final norm and the output layer only (the testbed's models do not tie them to the embeddings)."""
LORA = ["lora.rank=8", "lora.alpha=16"]
TAIL = "anchor.tail_fraction=0.25"


def prefix(n: int, *extra: str) -> list[str]:
    return ["prefix.schedule=constant", f"prefix.length={n}", *extra]


METHODS: dict[str, list[str]] = {
    "full": ["prefix.schedule=full"],
    "prefix-L2": prefix(2),
    "prefix-L8": prefix(8),
    "prefix-L32": prefix(32),
    "linear": ["prefix.schedule=linear", "prefix.start=2", "prefix.end=112"],
    "offpolicy-L8": prefix(8, "rollouts.source=teacher"),
    "seqkd": ["prefix.schedule=full", "rollouts.source=teacher", "loss=nll"],
    "sft-gold": ["prefix.schedule=full", "rollouts.source=gold", "loss=nll"],
    "readout-L8": prefix(8, FREEZE_TRUNK),
    "tail-L8": prefix(8, TAIL, "anchor.tail_target=teacher"),
    "tailref-L8": prefix(8, TAIL, "anchor.tail_target=reference"),
    "l2-L8": prefix(8, "anchor.l2=2.5"),
    "lora-full": ["prefix.schedule=full", *LORA],
    "lora-L8": prefix(8, *LORA),
}
"""Method name -> its overrides of COMMON (the learning rate comes from the sweep)."""

PREFIX_METHODS = [m for m in METHODS if m not in ("full", "seqkd", "sft-gold", "lora-full")]
"""The methods that train on student (or teacher) prefixes: candidates for 'the best prefix method'."""

TASKS = ("route", "relay")


def methods_for(task: str) -> dict[str, list[str]]:
    """The methods run on `task` (the same on both tasks, so the tables compare)."""
    return dict(METHODS)


RUN = (
    "full",
    "lora-full",
    "seqkd",
    "tail-L8",
    "tailref-L8",
    "linear",
    "prefix-L32",
    "prefix-L2",
    "prefix-L8",
    "lora-L8",
    "offpolicy-L8",
    "l2-L8",
    "sft-gold",
    "readout-L8",
)
"""The methods the committed table and sweep run (bench/paper_table.py's and paper_tune.py's default): every
method, the expensive ones (full-length rollouts or samples) first, so that a pool of runs ends together. At 600
steps a full-length method costs ~10 minutes of a job, a prefix one ~3; the whole table, 3 seeds on both tasks,
~3 hours of 2 cores at 3 jobs (the committed records were run in parts and combined: --combine)."""
