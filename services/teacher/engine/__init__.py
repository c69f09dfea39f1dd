"""Scoring engines behind one interface (`Engine`). Today: `hf` (transformers). A `vllm` backend (top-k via
vLLM's prompt_logprobs, no full rows) is on the roadmap and would plug in here; `ModelInfo.supports_full` and
validation already cover an engine without full rows."""

from __future__ import annotations

from services.teacher.engine.base import Engine
from services.teacher.modelinfo import EngineLimits

BACKENDS = ("hf",)


def load_engine(
    model: str,
    *,
    backend: str = "hf",
    dtype: str = "float32",
    device: str = "cpu",
    limits: EngineLimits | None = None,
) -> Engine:
    """Builds the engine for `backend` over `model` (a folder or hub id)."""
    if backend == "hf":
        from services.teacher.engine.hf import HFEngine

        return HFEngine(model, dtype=dtype, device=device, limits=limits)
    raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}.")


__all__ = ["BACKENDS", "Engine", "EngineLimits", "load_engine"]
