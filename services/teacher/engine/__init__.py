"""Scoring engines behind one interface (`Engine`), built from an `EngineSpec`: `hf` (transformers, the default)
and `vllm` (vLLM's prompt logprobs; optional, top-k only)."""

from __future__ import annotations

from services.teacher.engine.base import Engine
from services.teacher.spec import EngineSpec

BACKENDS = ("hf", "vllm")


def build_engine(spec: EngineSpec) -> Engine:
    """The engine `spec` describes (its backend over its model folder or hub id)."""
    if spec.backend == "hf":
        from services.teacher.engine.hf import HFEngine

        return HFEngine(spec)
    if spec.backend == "vllm":
        from services.teacher.engine.vllm_engine import VLLMEngine

        return VLLMEngine(spec)
    raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {spec.backend!r}.")


def load_engine(model: str, **overrides) -> Engine:
    """An in-process engine over `model`: the teacher's default settings with `overrides` (settings field
    names, e.g. `dtype="bfloat16"`, `max_batch_tokens=64`); the environment is not read."""
    from services.teacher.settings import in_process_spec

    return build_engine(in_process_spec(model, **overrides))


__all__ = ["BACKENDS", "Engine", "EngineSpec", "build_engine", "load_engine"]
