"""The trainer's one configuration tree: dataclasses with a `help` on every field, ranges checked on construction.

A run is described by a YAML file whose nesting mirrors the tree (`prefix: {schedule: linear, start: 8}`),
then `--set key=value` overrides with dotted keys (`--set prefix.length=32`). Values of overrides are parsed
as YAML scalars and then coerced to the field's type, so `--set lr=1e-4` is a float and `--set eval.every=0`
an int. Unknown keys are an error that lists the valid ones: a typo must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SCHEDULES = ("full", "constant", "linear", "step")
LOSSES = (
    "reverse_kl_sampled",
    "reverse_kl_topk",
    "forward_kl_topk",
    "jsd_topk",
    "reverse_kl_full",
    "forward_kl_full",
)
DTYPES = ("float32", "bfloat16")
PROMPT_FORMATS = ("auto", "chat", "raw")
LR_SCHEDULES = ("constant", "cosine", "linear")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range; the message names the key."""


def _f(default, help: str, **kw):
    """A dataclass field with its documentation (read by `describe()` for the config reference)."""
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"`{key}` {message}")


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
        _check(
            self.schedule in SCHEDULES,
            "prefix.schedule",
            f"must be one of {list(SCHEDULES)}, got {self.schedule!r}.",
        )
        # Bounds that involve max_new_tokens only bind the schedule that uses the field, so the defaults of
        # unused fields never get in the way of a short max_new_tokens.
        _check(self.length >= 1, "prefix.length", f"must be >= 1, got {self.length}.")
        if self.schedule == "constant":
            _check(
                self.length <= max_new_tokens,
                "prefix.length",
                f"must be in [1, max_new_tokens={max_new_tokens}], got {self.length}.",
            )
        _check(self.start >= 1, "prefix.start", f"must be >= 1, got {self.start}.")
        _check(self.stages >= 2, "prefix.stages", f"must be >= 2, got {self.stages}.")
        if self.schedule in ("linear", "step"):
            _check(
                self.start <= self.end <= max_new_tokens,
                "prefix.end",
                f"must be in [prefix.start={self.start}, max_new_tokens={max_new_tokens}], got {self.end}.",
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
    max_new_tokens: int = _f(64, "Length of the greedy evaluation answers (>= 1).")
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

    def validate(self) -> None:
        _check(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}.")
        if isinstance(self.prompts, int):
            _check(self.prompts >= 1, "eval.prompts", f"must be >= 1 or a source, got {self.prompts}.")
        else:
            _check(bool(self.prompts), "eval.prompts", "must be a count or a source, got ''.")
        _check(self.limit >= 0, "eval.limit", f"must be >= 0, got {self.limit}.")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}.")
        _check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}.")
        _check(self.head_tokens >= 1, "eval.head_tokens", f"must be >= 1, got {self.head_tokens}.")
        _check(self.samples >= 0, "eval.samples", f"must be >= 0, got {self.samples}.")


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
        "Job id sent with every request (queueing and fairness are per job); default: the "
        "name of output_dir.",
    )
    prompts: str = _f(
        "builtin:arith",
        "Training prompts: a JSONL file with `prompt` and optional `answer` "
        "fields, or builtin:NAME for a task shipped with the project (builtin:arith).",
    )
    prompt_format: str = _f(
        "auto", "auto (chat template when the student's tokenizer has one) | chat | raw (prompt text as is)."
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
        64, "Full response length: L of the `full` schedule and the cap of every schedule."
    )
    stop_at_eos: bool = _f(True, "Stop a rollout at the student's EOS token (false: always run L tokens).")
    prefix: PrefixConfig = _f(PrefixConfig, "Prefix schedule (nested: prefix: {schedule: ..., length: ...}).")
    loss: str = _f(
        "reverse_kl_sampled",
        "reverse_kl_sampled | reverse_kl_topk | forward_kl_topk | jsd_topk | "
        "reverse_kl_full | forward_kl_full.",
    )
    jsd_beta: float = _f(0.5, "beta of jsd_topk: 0 is forward KL, 1 reverse KL, 0.5 the symmetric JSD.")
    top_k: int = _f(16, "Teacher top-k per position for the *_topk losses (>= 1).")
    temperature: float = _f(1.0, "Student sampling temperature (> 0).")
    teacher_temperature: float = _f(1.0, "Temperature at which the teacher scores (> 0).")
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
    teacher_max_in_flight: int = _f(64, "Requests in flight to the teacher per rank (>= 1).")
    teacher_timeout_s: float = _f(120.0, "Deadline of one teacher request in seconds (> 0).")
    teacher_retries: int = _f(8, "Retries of a request on UNAVAILABLE (a teacher restart) (>= 0).")
    teacher_token: str = _f("", "Bearer token for the teacher (default: $PREFIX_DISTILL_TEACHER_TOKEN).")
    progress_bar: bool = _f(True, "Show a rich progress bar on rank 0.")
    tensorboard: bool = _f(True, "Write TensorBoard events to output_dir/tensorboard.")

    def __post_init__(self) -> None:
        if isinstance(self.prefix, dict):
            self.prefix = _build(PrefixConfig, self.prefix, "prefix.")
        if isinstance(self.eval, dict):
            self.eval = _build(EvalConfig, self.eval, "eval.")
        self.validate()

    def validate(self) -> None:
        _check(bool(self.student), "student", "is required: a model folder or hub id.")
        _check(bool(self.teacher), "teacher", "is required: grpc://host:port, host:port or inprocess:MODEL.")
        _check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}.")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}.")
        _check(
            self.samples_per_prompt >= 1,
            "samples_per_prompt",
            f"must be >= 1, got {self.samples_per_prompt}.",
        )
        _check(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}.")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}.")
        _check(
            self.lr_schedule in LR_SCHEDULES,
            "lr_schedule",
            f"must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}.",
        )
        _check(
            0 <= self.warmup_steps <= self.steps,
            "warmup_steps",
            f"must be in [0, steps], got {self.warmup_steps}.",
        )
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}.")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}.")
        _check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}.")
        self.prefix.validate(self.max_new_tokens)
        _check(self.loss in LOSSES, "loss", f"must be one of {list(LOSSES)}, got {self.loss!r}.")
        _check(0.0 <= self.jsd_beta <= 1.0, "jsd_beta", f"must be in [0, 1], got {self.jsd_beta}.")
        _check(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}.")
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}.")
        _check(
            self.teacher_temperature > 0,
            "teacher_temperature",
            f"must be > 0, got {self.teacher_temperature}.",
        )
        self.eval.validate()
        _check(bool(self.output_dir), "output_dir", "must be a folder path.")
        _check(self.save_every >= 0, "save_every", f"must be >= 0, got {self.save_every}.")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}.")
        _check(self.dtype in DTYPES, "dtype", f"must be one of {list(DTYPES)}, got {self.dtype!r}.")
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            f"must be auto, cpu or cuda, got {self.device!r}.",
        )
        _check(
            self.prompt_format in PROMPT_FORMATS,
            "prompt_format",
            f"must be one of {list(PROMPT_FORMATS)}, got {self.prompt_format!r}.",
        )
        _check(
            self.max_prompt_tokens >= 1, "max_prompt_tokens", f"must be >= 1, got {self.max_prompt_tokens}."
        )
        _check(
            self.teacher_max_in_flight >= 1,
            "teacher_max_in_flight",
            f"must be >= 1, got {self.teacher_max_in_flight}.",
        )
        _check(self.teacher_timeout_s > 0, "teacher_timeout_s", f"must be > 0, got {self.teacher_timeout_s}.")
        _check(self.teacher_retries >= 0, "teacher_retries", f"must be >= 0, got {self.teacher_retries}.")

    @property
    def run_job_id(self) -> str:
        """The job id actually sent: `job_id`, else the run folder's name."""
        return self.job_id or Path(self.output_dir).resolve().name

    @property
    def resolved_teacher_token(self) -> str | None:
        return self.teacher_token or os.environ.get("PREFIX_DISTILL_TEACHER_TOKEN") or None

    def to_dict(self) -> dict:
        """Plain nested dict (YAML-safe) of every field; `teacher_token` is never written out."""
        d = dataclasses.asdict(self)
        d["teacher_token"] = ""
        return d


# ----------------------------------------------------------------------------------------------------------
# Building from YAML and overrides


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(value, tp, key: str):
    """`value` (from YAML) as type `tp`; ConfigError naming `key` when it does not fit."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"`{key}` must be a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                f"got {value!r}."
            )
        return value
    args = typing.get_args(tp)
    if args:  # a union such as int | str: the first member that accepts the value exactly
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"`{key}` must be an integer or a string, got {value!r}.")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"`{key}` must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"`{key}` must be a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"`{key}` must be a number, got {value!r}.") from None
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"`{key}` must be a string, got {value!r}.")
        return str(value)
    raise AssertionError(f"unhandled field type {tp} of {key}")


def _build(cls, data: dict, prefix: str = ""):
    """An instance of dataclass `cls` from a nested dict, with types coerced and unknown keys refused."""
    if not isinstance(data, dict):
        raise ConfigError(f"`{prefix.rstrip('.') or 'config'}` must be a mapping, got {data!r}.")
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(
            f"unknown key `{prefix}{unknown[0]}`; valid keys here: "
            f"{', '.join(prefix + k for k in sorted(types))}."
        )
    kwargs = {}
    for name, value in data.items():
        tp = types[name]
        value = _coerce(value, tp, prefix + name)
        if dataclasses.is_dataclass(tp):
            value = _build(tp, value, prefix + name + ".")
        kwargs[name] = value
    return cls(**kwargs)


def apply_override(data: dict, assignment: str) -> None:
    """Applies one `key=value` (dotted key, YAML scalar value) to the nested dict `data` in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value (e.g. prefix.length=32).")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {assignment!r} has an empty key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    cls = TrainConfig
    node = data
    for i, part in enumerate(parts):
        types = _field_types(cls)
        dotted = ".".join(parts[: i + 1])
        if part not in types:
            prefix = ".".join(parts[:i]) + ("." if i else "")
            raise ConfigError(
                f"unknown key `{dotted}`; valid keys here: {', '.join(prefix + k for k in sorted(types))}."
            )
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(types[part]):
                raise ConfigError(
                    f"`{dotted}` is a section; set one of its keys, e.g. {dotted}."
                    f"{dataclasses.fields(types[part])[0].name}=..."
                )
            node[part] = value
        else:
            if not dataclasses.is_dataclass(types[part]):
                raise ConfigError(f"`{dotted}` is not a section; use {dotted}=value.")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"`{dotted}` must be a mapping.")
            cls = types[part]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (optional) plus `key=value` overrides, validated."""
    data: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}.") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}.")
    for assignment in overrides:
        apply_override(data, assignment)
    return _build(TrainConfig, data)


def config_from_dict(data: dict) -> TrainConfig:
    """TrainConfig from a nested dict (e.g. a saved config.yaml), validated."""
    return _build(TrainConfig, dict(data))


def describe(cls=TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, sections flattened: the configuration reference."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(
            (prefix + f.name, repr(default) if isinstance(default, str) else str(default), f.metadata["help"])
        )
    return rows
