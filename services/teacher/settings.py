"""One typed settings object per teacher process, read from CLI flags and `TEACHER_*` environment variables.

Precedence: explicit flag > environment variable > default. Every field is documented where it is defined
and range-checked by pydantic, so a bad value fails at start-up with the field named.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.teacher.spec import EngineLimits, EngineSpec


class TeacherSettings(BaseSettings):
    """Configuration of `prefix-distill teacher serve | frontend | worker`."""

    model_config = SettingsConfigDict(env_prefix="TEACHER_", extra="forbid")

    model: str = Field(description="Model folder or hub id of the teacher.")
    backend: Literal["hf"] = Field("hf", description="Scoring engine (hf: transformers).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    device: str = Field("cpu", description="cpu | cuda | cuda:N | auto.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis shared by front-ends and workers.")
    namespace: str = Field(
        "",
        description="Redis key namespace (keys are pd:<namespace>:...); default derived from the model so one "
        "Redis serves several teachers.",
    )
    grpc_host: str = Field("0.0.0.0", description="gRPC bind address.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: pick a free one).")
    http_host: str = Field("0.0.0.0", description="HTTP bind address.")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: pick a free one).")
    workers: int = Field(1, ge=0, le=64, description="In-process worker processes started by `serve`.")
    torch_threads: int = Field(0, ge=0, description="torch threads per worker (0: cores / workers).")
    max_batch_tokens: int = Field(
        8192,
        ge=1,
        description="Padded token budget of one batch: requests x longest prompt + completion (B x S); "
        "a single request must fit it alone.",
    )
    max_batch_size: int = Field(64, ge=1, description="Most requests in one batch.")
    batch_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="Wait window to gather a batch after waking."
    )
    max_top_k: int = Field(64, ge=1, description="Largest accepted top_k.")
    max_full_elements: int = Field(
        64 * 1024 * 1024, ge=1, description="Memory guard: completion positions x vocab per full-row request."
    )
    max_pending_per_job: int = Field(4096, ge=1, description="Queued requests per job before 429.")
    visibility_timeout_s: float = Field(
        30.0, gt=0, description="A claimed batch not acknowledged (or extended) within this is re-claimed."
    )
    max_tries: int = Field(3, ge=1, description="Attempts before a request fails for good with INTERNAL.")
    request_timeout_s: float = Field(120.0, gt=0, description="Default deadline of a request.")
    result_ttl_s: float = Field(
        300.0, gt=0, description="Reply lists of vanished front-ends expire after this."
    )
    worker_ttl_s: float = Field(5.0, gt=0, description="A worker silent for this long counts as dead.")
    stream_window: int = Field(
        256, ge=1, description="In-flight requests per ScoreStream call (flow control)."
    )
    max_message_mb: int = Field(256, ge=4, description="gRPC max send/receive message size (MiB).")

    @classmethod
    def in_process(cls, model: str, **overrides) -> TeacherSettings:
        """Settings of an engine inside this process (`score`, the trainer's local teacher, tests, benchmarks):
        the defaults above with `overrides` (field names), the environment ignored. The engine checks the
        values it uses (backend, dtype, device, limits) when it is built."""
        unknown = sorted(set(overrides) - set(cls.model_fields))
        if unknown:
            raise TypeError(f"unknown teacher settings {unknown}")
        return cls.model_construct(model=model, **overrides)

    def limits(self) -> EngineLimits:
        return EngineLimits(
            max_top_k=self.max_top_k,
            max_full_elements=self.max_full_elements,
            max_batch_tokens=self.max_batch_tokens,
            max_pending_per_job=self.max_pending_per_job,
        )

    def engine_spec(self) -> EngineSpec:
        """The one description of the engine this teacher runs (what workers load and front-ends describe)."""
        return EngineSpec(
            model=self.model, backend=self.backend, dtype=self.dtype, device=self.device, limits=self.limits()
        )

    def key_namespace(self) -> str:
        """`pd:<name>:`, the start of every Redis key of this teacher, where <name> is `namespace` or a
        readable slug + hash of the model id."""
        if self.namespace:
            return f"pd:{self.namespace}:"
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model.rstrip("/").split("/")[-1])[:40]
        digest = hashlib.sha1(self.model.encode()).hexdigest()[:8]
        return f"pd:{slug}-{digest}:"

    def grpc_options(self) -> list[tuple[str, int]]:
        n = self.max_message_mb * 1024 * 1024
        return [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]


def in_process_spec(model: str, **overrides) -> EngineSpec:
    """The EngineSpec of an in-process engine over `model` (see `TeacherSettings.in_process`)."""
    return TeacherSettings.in_process(model, **overrides).engine_spec()
