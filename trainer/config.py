"""The trainer's one configuration tree: dataclasses with a `help` on every field, ranges checked on construction.

A run is described by a YAML file whose nesting mirrors the tree (`prefix: {schedule: linear, start: 8}`),
then `--set key=value` overrides with dotted keys (`--set prefix.length=32`); `trainer.configio` does the
building, coercing and describing. The loss choices come from the loss table (`trainer.losses.LOSSES`), the
`teacher_client` section is the client's own `ClientOptions`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from services.teacher.client import ClientOptions
from services.teacher.errors import InvalidRequest
from services.teacher.types import check_id
from trainer import configio
from trainer.configio import ConfigError, check
from trainer.configio import documented as _f
from trainer.losses import LOSSES
from trainer.tasks import SPLITS

__all__ = [
    "AnchorConfig",
    "ConfigError",
    "EvalConfig",
    "LoraConfig",
    "PrefixConfig",
    "RolloutsConfig",
    "TrainConfig",
    "apply_override",
    "config_from_dict",
    "describe",
    "load_config",
]

SCHEDULES = ("full", "constant", "linear", "step")
DTYPES = ("float32", "bfloat16")
PROMPT_FORMATS = ("auto", "chat", "raw")
LR_SCHEDULES = ("constant", "cosine", "linear")
ROLLOUT_SOURCES = ("student", "teacher", "gold")
TAIL_TARGETS = ("reference", "teacher")


@dataclass
class PrefixConfig:
    """How many tokens each student rollout is allowed to run (the prefix length L) as a function of the step."""

    schedule: str = _f(
        "constant",
        "full (L = max_new_tokens, plain on-policy distillation) | constant (L = "
        "prefix.length) | linear (prefix.start to prefix.end over the run) | step (prefix.stages "
        "equal stages from prefix.start to prefix.end).",
    )
    length: int = _f(16, "L of the `constant` schedule, in tokens (1..max_new_tokens).")
    start: int = _f(8, "L at the first step of the `linear` and `step` schedules (>= 1).")
    end: int = _f(
        64, "L at the last step of the `linear` and `step` schedules (>= prefix.start, <= max_new_tokens)."
    )
    stages: int = _f(4, "Number of constant stages of the `step` schedule (>= 2).")

    def validate(self, max_new_tokens: int) -> None:
        check(
            self.schedule in SCHEDULES,
            "prefix.schedule",
            f"must be one of {list(SCHEDULES)}, got {self.schedule!r}.",
        )
        # Bounds that involve max_new_tokens only bind the schedule that uses the field, so the defaults of
        # unused fields never get in the way of a short max_new_tokens.
        check(self.length >= 1, "prefix.length", f"must be >= 1, got {self.length}.")
        if self.schedule == "constant":
            check(
                self.length <= max_new_tokens,
                "prefix.length",
                f"must be in [1, max_new_tokens={max_new_tokens}], got {self.length}.",
            )
        check(self.start >= 1, "prefix.start", f"must be >= 1, got {self.start}.")
        check(self.stages >= 2, "prefix.stages", f"must be >= 2, got {self.stages}.")
        if self.schedule in ("linear", "step"):
            check(
                self.start <= self.end <= max_new_tokens,
                "prefix.end",
                f"must be in [prefix.start={self.start}, max_new_tokens={max_new_tokens}], got {self.end}.",
            )


@dataclass
class RolloutsConfig:
    """Who writes the rollouts that are scored and trained on: the student (on-policy) or not (off-policy)."""

    source: str = _f(
        "student",
        "student (on-policy distillation) | teacher (sampled by a local copy of the teacher model, "
        "rollouts.model: off-policy, the same loss; the teacher service still scores them) | gold (the "
        "task's reference answers, tokenized as is and cut to the step's L, EOS included when it fits: "
        "supervised training with loss=nll; the task must have answers).",
    )
    model: str = _f(
        "",
        "The sampling model of source=teacher: a folder loadable by AutoModelForCausalLM that shares the "
        "student's tokenizer. Default: the teacher's advertised model id when it is a folder here, else the "
        "MODEL of teacher=inprocess:MODEL.",
    )

    def validate(self) -> None:
        check(
            self.source in ROLLOUT_SOURCES,
            "rollouts.source",
            f"must be one of {list(ROLLOUT_SOURCES)}, got {self.source!r}.",
        )


@dataclass
class AnchorConfig:
    """What keeps a short-prefix run from ruining the rest of the student's answers (the tail)."""

    l2: float = _f(
        0.0,
        "Adds l2 x the sum over trained parameters of (theta - theta0)^2 to each step's loss, theta0 the "
        "starting weights of `student` (also when resuming) (>= 0; 0: off).",
    )
    tail_fraction: float = _f(
        0.0,
        "Fraction of each step's rollouts (round(f x rollouts) of this rank, the first ones) that run to "
        "max_new_tokens instead of the step's L, when L < max_new_tokens ([0, 1]; 0: off).",
    )
    tail_target: str = _f(
        "reference",
        "What trains the positions >= L of those full-length rollouts: reference (the teacher scores only "
        "their first L tokens; the rest get the exact KL(student || reference), the reference being a frozen "
        "copy of the starting student, times anchor.tail_weight) | teacher (the teacher scores every "
        "position and the configured loss trains them all: full distillation on a subset).",
    )
    tail_weight: float = _f(1.0, "Weight of the tail's KL to the reference (tail_target=reference) (>= 0).")

    def validate(self) -> None:
        check(self.l2 >= 0, "anchor.l2", f"must be >= 0, got {self.l2}.")
        check(
            0.0 <= self.tail_fraction <= 1.0,
            "anchor.tail_fraction",
            f"must be in [0, 1], got {self.tail_fraction}.",
        )
        check(
            self.tail_target in TAIL_TARGETS,
            "anchor.tail_target",
            f"must be one of {list(TAIL_TARGETS)}, got {self.tail_target!r}.",
        )
        check(self.tail_weight >= 0, "anchor.tail_weight", f"must be >= 0, got {self.tail_weight}.")

    @property
    def uses_reference(self) -> bool:
        """Whether the run needs the frozen starting student as a reference policy."""
        return self.tail_fraction > 0 and self.tail_target == "reference"


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Every linear layer of a Llama-family decoder layer (SmolLM2, Qwen, Mistral name them the same)."""


@dataclass
class LoraConfig:
    """A low-rank update instead of training the weights (peft's LoRA): the restricted update that also works
    where the output layer is tied to the embeddings (SmolLM2, small Qwen3), unlike `freeze`."""

    rank: int = _f(0, "LoRA rank r (0: off, every parameter trains unless frozen).")
    alpha: float = _f(16.0, "LoRA alpha: the update is scaled by alpha / rank (> 0).")
    target_modules: list[str] = _f(LORA_TARGETS, "Module names that get a LoRA update (peft target_modules).")
    dropout: float = _f(0.0, "Dropout on the LoRA input ([0, 1)).")

    def validate(self, freeze: list[str]) -> None:
        check(self.rank >= 0, "lora.rank", f"must be >= 0, got {self.rank}.")
        check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}.")
        check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}.")
        check(bool(self.target_modules), "lora.target_modules", "must name at least one module.")
        check(
            not (self.rank and freeze),
            "freeze",
            "cannot be combined with lora.rank > 0 (LoRA already trains only its adapters).",
        )


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy full-length answers, exact-match accuracy and per-token KL to the teacher."""

    every: int = _f(0, "Evaluate every this many steps (0: only before the first and after the last step).")
    prompts: int | str = _f(
        32,
        "Held-out prompts: an integer N (the first N of the held-out split of `prompts`), "
        "or a source (a JSONL path or builtin:NAME, whose held-out split is used).",
    )
    limit: int = _f(0, "At most this many prompts from a source given in eval.prompts (0: all).")
    split: str = _f(
        "heldout",
        "Which prompts eval.prompts counts from: `heldout` (the task's held-out split) or `validation` (a fixed "
        "part of the training prompts, then left out of training: for choosing settings without ever "
        "measuring the held-out split).",
    )
    max_new_tokens: int = _f(64, "Length of the greedy evaluation answers, in tokens (>= 1).")
    batch_size: int = _f(8, "Prompts per evaluation generation batch (>= 1).")
    head_tokens: int = _f(
        16,
        "The first this many answer positions form the 'head' of eval/kl_head; the rest "
        "is the tail of eval/kl_tail (>= 1).",
    )
    full_rows: bool = _f(
        True,
        "Measure KL with the teacher's full vocabulary rows (exact); false: top-k with a "
        "tail bucket (a lower bound, for teachers that cannot return full rows).",
    )
    at_start: bool = _f(
        True, "Also evaluate before the first step (the 'before' figures of the run summary)."
    )
    samples: int = _f(3, "Sample answers kept in the run summary and in samples.jsonl (>= 0).")
    execution: bool = _f(
        True,
        "On decision tasks (builtin:route, builtin:relay), also eval/execution: the accuracy of answers written "
        "with the teacher's preferred decisions forced (one more greedy pass; eval/agreement is free).",
    )
    top_k: int = _f(
        64,
        "Teacher top-k of the evaluation KL when full rows are not used (eval.full_rows false, or a teacher "
        "that cannot return them): KL over these k tokens plus a tail bucket, a lower bound (>= 1; capped "
        "by the teacher's max_top_k and the vocabulary).",
    )

    def validate(self) -> None:
        check(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}.")
        if isinstance(self.prompts, int):
            check(self.prompts >= 1, "eval.prompts", f"must be >= 1 or a source, got {self.prompts}.")
        else:
            check(bool(self.prompts), "eval.prompts", "must be a count or a source, got ''.")
        check(self.limit >= 0, "eval.limit", f"must be >= 0, got {self.limit}.")
        check(self.split in SPLITS, "eval.split", f"must be one of {', '.join(SPLITS)}, got {self.split!r}.")
        check(self.max_new_tokens >= 1, "eval.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}.")
        check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}.")
        check(self.head_tokens >= 1, "eval.head_tokens", f"must be >= 1, got {self.head_tokens}.")
        check(self.samples >= 0, "eval.samples", f"must be >= 0, got {self.samples}.")
        check(self.top_k >= 1, "eval.top_k", f"must be >= 1, got {self.top_k}.")


@dataclass
class TrainConfig:
    """One distillation run (`prefix-distill train --config run.yaml --set key=value`)."""

    student: str = _f("", "Student model: a folder or hub id loadable by AutoModelForCausalLM (required).")
    teacher: str = _f(
        "",
        "Teacher service: grpc://host:port (or host:port); inprocess:MODEL scores in this "
        "process without a service (for trials without Redis) (required).",
    )
    job_id: str = _f(
        "",
        "Job id sent with every request (queueing, fairness and token scopes are per job; up to 128 of "
        "A-Z a-z 0-9 . _ : / @ + -); default: the name of output_dir.",
    )
    prompts: str = _f(
        "builtin:arith",
        "Training prompts: a JSONL file with `prompt` and optional `answer` "
        "fields, or builtin:NAME for a task shipped with the project (builtin:plan, builtin:chain: the testbed's "
        "rule tasks; builtin:arith: word problems for chat models).",
    )
    prompt_format: str = _f(
        "auto",
        "auto (chat template when the student's tokenizer has one; a rule task's prompt as is) | chat | "
        "raw (prompt text as is).",
    )
    steps: int = _f(100, "Optimizer steps (>= 1).")
    batch_size: int = _f(8, "Prompts per step and per rank (>= 1).")
    samples_per_prompt: int = _f(1, "Student rollouts per prompt (>= 1).")
    micro_batch_size: int = _f(
        4,
        "Rollouts sampled, scored and trained together; the next micro-batch is "
        "sampled while the teacher scores the previous one (>= 1).",
    )
    lr: float = _f(1e-5, "Peak learning rate of AdamW (> 0).")
    lr_schedule: str = _f("constant", "constant | cosine | linear decay to 0 after the warm-up.")
    warmup_steps: int = _f(0, "Linear learning-rate warm-up steps (>= 0).")
    weight_decay: float = _f(0.0, "AdamW weight decay (>= 0).")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0: no clipping).")
    max_new_tokens: int = _f(
        64,
        "Full response length in tokens: L of the `full` schedule and the cap of every prefix schedule "
        "(a rollout runs for the step's prefix length L <= max_new_tokens, or to EOS).",
    )
    stop_at_eos: bool = _f(True, "Stop a rollout at the student's EOS token (false: always run L tokens).")
    prefix: PrefixConfig = _f(PrefixConfig, "Prefix schedule (nested: prefix: {schedule: ..., length: ...}).")
    loss: str = _f(
        "reverse_kl_sampled",
        "Distillation loss, a row of the loss table in trainer/losses.py ([what the teacher sends]; reverse KL "
        "is KL(student || teacher)): "
        + "; ".join(f"{name} [{row.need.value}]: {row.help}" for name, row in LOSSES.items())
        + ".",
    )
    jsd_beta: float = _f(0.5, "beta of jsd_topk: 0 is forward KL, 1 reverse KL, 0.5 the symmetric JSD.")
    top_k: int = _f(
        16,
        "Teacher top-k per position for the losses that need it ([topk] or [candidates_topk] under `loss`) "
        "(>= 1).",
    )
    candidates: int = _f(
        16,
        "C, the student's top-C ids per position sent as candidates for the losses that need them "
        "([candidates] or [candidates_topk] under `loss`): the teacher returns its log-probabilities at exactly "
        "those ids (>= 1; at most the teacher's max_candidates).",
    )
    temperature: float = _f(1.0, "Sampling temperature of the rollouts (> 0).")
    teacher_temperature: float = _f(1.0, "Temperature at which the teacher scores (> 0).")
    rollouts: RolloutsConfig = _f(
        RolloutsConfig, "Rollout source (nested: rollouts: {source: teacher, model: ...})."
    )
    anchor: AnchorConfig = _f(
        AnchorConfig, "Anchors toward the starting student (nested: anchor: {l2: ..., tail_fraction: ...})."
    )
    freeze: list[str] = _f(
        [],
        "Parameters whose name starts with one of these prefixes are not trained (e.g. [model.embed_tokens, "
        "model.layers.0]); each prefix must match a parameter.",
    )
    lora: LoraConfig = _f(
        LoraConfig, "LoRA adapters instead of full training (nested: lora: {rank: 8, ...})."
    )
    eval: EvalConfig = _f(EvalConfig, "Evaluation (nested: eval: {every: ..., prompts: ...}).")
    output_dir: str = _f("runs/run", "Run folder: metrics.jsonl, TensorBoard events, checkpoints/, final/.")
    save_every: int = _f(0, "Checkpoint every this many steps (0: only at the end).")
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk, newest first (>= 1).")
    seed: int = _f(
        0, "Seed of prompt order, sampling and initialisation (rank r uses seed + r for its data)."
    )
    dtype: str = _f(
        "float32",
        "float32 | bfloat16 (autocast for the student's forward passes; master weights "
        "and optimizer stay float32).",
    )
    device: str = _f("auto", "auto | cpu | cuda (under torchrun: this rank's GPU).")
    max_prompt_tokens: int = _f(512, "Prompts longer than this are skipped with a warning (>= 1).")
    teacher_client: ClientOptions = _f(
        ClientOptions, "How the trainer talks to the teacher (nested: teacher_client: {max_in_flight: ...})."
    )
    progress_bar: bool = _f(True, "Show a rich progress bar on rank 0.")
    tensorboard: bool = _f(True, "Write TensorBoard events to output_dir/tensorboard.")

    def __post_init__(self) -> None:
        configio.build_sections(self)
        self.validate()

    def validate(self) -> None:
        check(bool(self.student), "student", "is required: a model folder or hub id.")
        check(bool(self.teacher), "teacher", "is required: grpc://host:port, host:port or inprocess:MODEL.")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}.")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}.")
        check(
            self.samples_per_prompt >= 1,
            "samples_per_prompt",
            f"must be >= 1, got {self.samples_per_prompt}.",
        )
        check(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}.")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}.")
        check(
            self.lr_schedule in LR_SCHEDULES,
            "lr_schedule",
            f"must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}.",
        )
        check(
            0 <= self.warmup_steps <= self.steps,
            "warmup_steps",
            f"must be in [0, steps], got {self.warmup_steps}.",
        )
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}.")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}.")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}.")
        self.prefix.validate(self.max_new_tokens)
        check(self.loss in LOSSES, "loss", f"must be one of {list(LOSSES)}, got {self.loss!r}.")
        check(0.0 <= self.jsd_beta <= 1.0, "jsd_beta", f"must be in [0, 1], got {self.jsd_beta}.")
        check(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}.")
        check(self.candidates >= 1, "candidates", f"must be >= 1, got {self.candidates}.")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}.")
        check(
            self.teacher_temperature > 0,
            "teacher_temperature",
            f"must be > 0, got {self.teacher_temperature}.",
        )
        self.rollouts.validate()
        self.anchor.validate()
        check(all(self.freeze), "freeze", f"must hold non-empty name prefixes, got {self.freeze!r}.")
        self.lora.validate(self.freeze)
        self.eval.validate()
        check(bool(self.output_dir), "output_dir", "must be a folder path.")
        try:  # the teacher's own rule for job ids (a Redis key part and a metrics label)
            check_id(self.run_job_id, "job_id", required=True)
        except InvalidRequest as err:
            raise ConfigError(f"{err.message} (default: the name of output_dir)") from None
        check(self.save_every >= 0, "save_every", f"must be >= 0, got {self.save_every}.")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}.")
        check(self.dtype in DTYPES, "dtype", f"must be one of {list(DTYPES)}, got {self.dtype!r}.")
        check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            f"must be auto, cpu or cuda, got {self.device!r}.",
        )
        check(
            self.prompt_format in PROMPT_FORMATS,
            "prompt_format",
            f"must be one of {list(PROMPT_FORMATS)}, got {self.prompt_format!r}.",
        )
        check(
            self.max_prompt_tokens >= 1, "max_prompt_tokens", f"must be >= 1, got {self.max_prompt_tokens}."
        )

    @property
    def run_job_id(self) -> str:
        """The job id actually sent: `job_id`, else the run folder's name."""
        return self.job_id or Path(self.output_dir).resolve().name

    def to_dict(self) -> dict:
        """Plain nested dict (YAML-safe) of every field; the teacher token is never written out."""
        d = dataclasses.asdict(self)
        d["teacher_client"]["token"] = ""
        return d


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (optional) plus `key=value` overrides, validated."""
    data = configio.read_yaml(path) if path is not None else {}
    for assignment in overrides:
        apply_override(data, assignment)
    return configio.build(TrainConfig, data)


def config_from_dict(data: dict) -> TrainConfig:
    """TrainConfig from a nested dict (e.g. a saved config.yaml), validated."""
    return configio.build(TrainConfig, dict(data))


def apply_override(data: dict, assignment: str) -> None:
    """Applies one `key=value` (dotted key, YAML scalar value) to the nested dict `data` of a TrainConfig."""
    configio.apply_override(data, assignment, TrainConfig)


def describe() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, sections flattened: the configuration reference."""
    return configio.describe(TrainConfig)
