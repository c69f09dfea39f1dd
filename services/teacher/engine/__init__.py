"""Scoring engines behind one interface (`Engine`): `hf` (transformers, default) and `vllm` (optional)."""

from __future__ import annotations

from services.teacher.engine.base import Engine
from services.teacher.modelinfo import EngineLimits

BACKENDS = ("hf", "vllm")


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
    if backend == "vllm":
        try:
            from services.teacher.engine.vllm import VLLMEngine
        except ImportError as err:
            raise ValueError(f"`backend` 'vllm' needs the optional vllm extra: {err}") from err
        return VLLMEngine(model, dtype=dtype, device=device, limits=limits)
    raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}.")


__all__ = ["BACKENDS", "Engine", "EngineLimits", "load_engine"]
