"""What a teacher engine is built from: `EngineSpec` (model, backend, dtype, device) and its `EngineLimits`.

Both are made once from `TeacherSettings` (the only place their defaults are written) and passed on, unchanged,
to the engine, to the model description a front-end builds without weights, and to the workers. Neither
class has defaults of its own, so no second copy of a default can drift from the settings.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class EngineLimits:
    """Per-teacher limits, advertised in `ModelInfo` and enforced by request validation and the queue."""

    max_top_k: int
    """Largest accepted `top_k`."""
    max_candidates: int
    """Largest accepted `num_candidates` (candidate ids scored per position)."""
    max_full_elements: int
    """Memory guard for full rows: completion positions x vocab per request (64M float32 = 256 MB)."""
    max_batch_tokens: int
    """Padded token budget of one forward pass: requests in the batch x its longest prompt + completion
    (B x S). Workers claim and engines split batches within it; one request alone must fit it."""
    max_pending_per_job: int
    """Requests one job may have queued (not yet claimed) before RESOURCE_EXHAUSTED."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 1:
                raise ValueError(f"`{f.name}` must be >= 1, got {value}.")


@dataclass(frozen=True)
class EngineSpec:
    """Which engine to build and over which model: everything `build_engine` and `describe` need."""

    model: str
    """Model folder or hub id."""
    backend: str
    """Scoring engine (`hf`)."""
    dtype: str
    """Weights dtype: float32, bfloat16 or float16."""
    device: str
    """cpu | cuda | cuda:N | auto."""
    limits: EngineLimits
    """The limits the engine advertises and enforces."""
    prompt_cache_mb: int
    """Bound of the kept prompt keys/values (engine/prompt_kv.py), MiB; 0 turns prompt reuse off."""
    lm_head_dtype: str
    """`same` (the weights dtype) or `float32`: a float32 LM head over a lower-precision trunk."""
    cpu_linear: str
    """Linear kernels on a CPU: `auto` (oneDNN where a probe at load finds it faster), `torch` or `onednn`
    (engine/cpu_linear.py)."""
    cpu_attention: str
    """Attention on a CPU: `auto`, `sdpa` or `blocked` (engine/cpu_attention.py)."""
    cpu_keep_heap: bool
    """On a CPU, keep freed memory in the process heap rather than returning it to the OS (engine/cpu_heap.py)."""
