"""One typed settings object per teacher process, read from CLI flags and `TEACHER_*` environment variables.

Precedence: explicit flag > environment variable > default. Every field is documented where it is defined
and range-checked by pydantic, so a bad value fails at start-up with the field named.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.teacher.spec import EngineLimits, EngineSpec


class TeacherSettings(BaseSettings):
    """Configuration of `prefix-distill teacher serve | frontend | worker`."""

    model_config = SettingsConfigDict(env_prefix="TEACHER_", extra="forbid")

    model: str = Field(description="Model folder or hub id of the teacher.")
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="Scoring engine: hf (transformers) or vllm (vLLM prompt logprobs, recommended on a GPU; "
        "needs vLLM installed, no full rows, temperature 1 only).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    device: str = Field("cpu", description="cpu | cuda | cuda:N | auto.")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis shared by front-ends and workers: redis://[[user]:password@]host:port/db, or "
        "rediss://... for TLS (e.g. ?ssl_ca_certs=/path/ca.pem); the password (in the URL or as ?password=) is "
        "never logged. A URL with a password belongs in TEACHER_REDIS_URL or redis_url_file, not on the command "
        "line, where every local user can read it (/proc/PID/cmdline).",
    )
    redis_url_file: str = Field(
        "",
        description="A file whose first line is redis_url (overrides it): keeps a Redis password out of the "
        "command line and the environment (make it readable by the teacher's user only).",
    )
    namespace: str = Field(
        "",
        description="Redis key namespace (keys are pd:<namespace>:...); default derived from the model so one "
        "Redis serves several teachers.",
    )
    served_model_name: str = Field(
        "",
        description="The model's name in the vLLM dialect (`GET /v1/models` ids, the `model` a "
        "`/v1/completions` call may name; vLLM's --served-model-name); default: `model`.",
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
        description="Token budget of one batch: requests x longest prompt + completion (B x S); with prompt reuse, "
        "a request whose prompt the batch already holds counts only its completion tokens. A single request must "
        "fit it alone.",
    )
    max_batch_size: int = Field(64, ge=1, description="Most requests in one batch.")
    share_prompt_cache: bool = Field(
        False,
        description="Share the prompt cache across tenants (tokens). Off (the default), a request reuses only "
        "prompts its own token sent, so `prompt_tokens_reused` never tells one tenant what another sent; on, equal "
        "prompts of different tenants are computed once (less compute), at the price of that membership oracle.",
    )
    prompt_cache_mb: int = Field(
        256,
        ge=0,
        description="Memory for prompt keys/values kept across batches (MiB): requests sharing a prompt compute "
        "it once (hf backend on CPU, full-attention models); 0: off, every request computed in a plain padded "
        "pass.",
    )
    lm_head_dtype: Literal["same", "float32"] = Field(
        "same",
        description="LM head precision: same as the weights, or float32 over a bfloat16/float16 trunk (on "
        "SmolLM2 a third less error than bfloat16, at bfloat16's speed on CPUs with bfloat16 units; the trunk "
        "keeps the rest of its error).",
    )
    cpu_linear: Literal["auto", "torch", "onednn"] = Field(
        "auto",
        description="Linear kernels on a CPU: oneDNN with pre-packed weights (1.2-2x MKL's float32 speed on "
        "AMD CPUs; float32 results differ at rounding level), torch's own, or auto: oneDNN where a probe of the "
        "model's projection shapes at load finds it faster in each of 3 interleaved trials (trials that disagree, "
        "as on a busy machine, keep torch). The worker logs the kernels chosen, and why, at start-up.",
    )
    cpu_attention: Literal["auto", "sdpa", "blocked"] = Field(
        "auto",
        description="hf backend on a CPU: torch's sdpa (flash kernel), blocked (causal query blocks on batched "
        "GEMMs: 1.15x the bfloat16 SmolLM2 engine on AVX512-BF16 cores, 1.035x in float32), or auto: blocked "
        "where a probe at load finds it faster than sdpa for the model's heads in each of 3 interleaved trials "
        "(else sdpa).",
    )
    cpu_keep_heap: bool = Field(
        True,
        description="hf backend on a CPU: keep freed memory in the process heap (glibc mallopt) rather than "
        "returning it to the OS after every batch: no page faults on each batch's activations (~15% faster on "
        "2 cores); the process keeps its peak memory.",
    )
    batch_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="Wait window to gather a batch after waking; repeated while requests keep arriving, up to "
        "batch_wait_max_ms.",
    )
    batch_wait_max_ms: float = Field(
        100.0,
        ge=0,
        le=10000,
        description="Longest a worker gathers a burst before claiming (a trainer's step sends its rollouts as "
        "one burst: claimed after its first request, the rest waited for a second batch; 64 requests took 20-50 "
        "ms to arrive on 2 busy cores). Only an idle worker gathers, and only while requests keep arriving.",
    )
    max_top_k: int = Field(64, ge=1, description="Largest accepted top_k.")
    max_candidates: int = Field(
        256, ge=1, description="Largest accepted num_candidates: candidate ids scored per position."
    )
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
    max_message_mb: int = Field(
        256, ge=4, description="Largest gRPC message sent (MiB): a response with full rows can be large."
    )
    max_request_mb: int = Field(
        4,
        ge=1,
        description="Largest request accepted (MiB): a gRPC message or an HTTP body; larger ones are refused "
        "(RESOURCE_EXHAUSTED / 413) before they are parsed.",
    )
    http_body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Time an HTTP request's whole body has to arrive, from its first read (a slow or short "
        "body is answered 408 naming `body`, and the connection closed); 30 s takes a 4 MiB body at 140 kB/s.",
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time an HTTP connection has to send a request's whole header, from its opening or the "
        "first byte of its next request (then 408 and closed). Idle keep-alive connections close after 5 s "
        "(uvicorn's timeout_keep_alive); a header is at most 16 KiB (h11's incomplete-event bound).",
    )
    http_max_connections_per_client: int = Field(
        256,
        ge=0,
        description="Open HTTP connections one client address may hold; more are answered 503 and closed (0: "
        "no bound). Behind a proxy every client has the proxy's address: bound them there instead.",
    )
    retry_after_s: float = Field(
        0.5,
        gt=0,
        description="Retry-after hint sent with RESOURCE_EXHAUSTED / 429 when a job's queue is full.",
    )
    max_metric_jobs: int = Field(
        50,
        ge=1,
        description="Distinct job labels kept in /metrics: the deepest queues by name, the rest summed "
        'under job="_other".',
    )
    # -- security ----------------------------------------------------------------------------------------------
    auth_tokens_file: str = Field(
        "",
        description="Token file: one `TOKEN [JOB_PREFIX] [max_pending=N] [tokens_per_s=X] [max_queued_bytes=B] [job=J] [weight=W]` per line (weight: "
        "the token's claims per batching round, default 1; a `#` at "
        "the start of a line or after whitespace starts a comment; a `#` inside a token is part of it). When set, every call but /healthz (and /metrics, see metrics_need_token) needs a listed "
        "token, and a token serves only job ids starting with its prefix. Also --auth-tokens.",
        json_schema_extra={"flag_aliases": ["--auth-tokens"]},
    )
    metrics_need_token: bool = Field(
        True, description="With auth_tokens_file set: whether GET /metrics needs a token too."
    )
    quota_max_pending: int = Field(
        0, ge=0, description="Default per-token quota: requests in flight on one front-end (0: no quota)."
    )
    quota_max_queued_mb: int = Field(
        256,
        ge=0,
        description="Default per-token quota: MiB of requests (as queued, re-encoded) one token may hold in Redis "
        "at once, across all its job ids, from one front-end; over it 429 (0: no bound). Without it one token "
        "could fill Redis through many job ids.",
    )
    quota_tokens_per_s: float = Field(
        0.0,
        ge=0,
        description="Default per-token quota: prompt + completion tokens admitted per second on one "
        "front-end, bursts up to one second's worth (0: no quota).",
    )
    tls_cert_file: str = Field(
        "", description="PEM certificate chain: serve gRPC and HTTP over TLS (with tls_key_file)."
    )
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file.")

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
            max_candidates=self.max_candidates,
            max_full_elements=self.max_full_elements,
            max_batch_tokens=self.max_batch_tokens,
            max_pending_per_job=self.max_pending_per_job,
        )

    def engine_spec(self) -> EngineSpec:
        """The one description of the engine this teacher runs (what workers load and front-ends describe)."""
        return EngineSpec(
            model=self.model,
            backend=self.backend,
            dtype=self.dtype,
            device=self.device,
            limits=self.limits(),
            prompt_cache_mb=self.prompt_cache_mb,
            lm_head_dtype=self.lm_head_dtype,
            cpu_linear=self.cpu_linear,
            cpu_attention=self.cpu_attention,
            cpu_keep_heap=self.cpu_keep_heap,
        )

    def key_namespace(self) -> str:
        """`pd:<name>:`, the start of every Redis key of this teacher, where <name> is `namespace` or a
        readable slug + hash of the model id."""
        if self.namespace:
            return f"pd:{self.namespace}:"
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model.rstrip("/").split("/")[-1])[:40]
        digest = hashlib.sha1(self.model.encode()).hexdigest()[:8]
        return f"pd:{slug}-{digest}:"

    def redacted_redis_url(self) -> str:
        """`redis_url` fit for a log line (see `redact_url`)."""
        return redact_url(self.redis_url)

    def grpc_options(self) -> list[tuple[str, int]]:
        """Server channel options: large responses, small requests (an oversize one is refused unread)."""
        return [
            ("grpc.max_send_message_length", self.max_message_mb * 1024 * 1024),
            ("grpc.max_receive_message_length", self.max_request_bytes),
        ]

    @property
    def max_request_bytes(self) -> int:
        return self.max_request_mb * 1024 * 1024

    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, url: str) -> str:
        """A URL whose port is a number (else redis-py fails at connect with a traceback); the error never
        echoes the URL, which may hold a password."""
        host = urlsplit(url).netloc.rsplit("@", 1)[-1]
        try:
            _ = urlsplit(url).port
        except ValueError:
            raise ValueError(
                f"the port of the Redis URL must be a number in [0, 65535], got {host.rpartition(':')[2]!r}"
            ) from None
        return url

    @model_validator(mode="after")
    def _url_from_file(self) -> TeacherSettings:
        if self.redis_url_file:
            try:
                lines = Path(self.redis_url_file).read_text().splitlines()
            except OSError as err:
                raise ValueError(f"--redis-url-file {self.redis_url_file}: {err.strerror}") from None
            if not lines or not lines[0].strip():
                raise ValueError(f"--redis-url-file {self.redis_url_file}: the first line holds no URL")
            self.redis_url = self._redis_url_parses(lines[0].strip())
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> TeacherSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            given, missing = ("cert", "key") if self.tls_cert_file else ("key", "cert")
            raise ValueError(
                f"--tls-cert-file and --tls-key-file (TEACHER_TLS_CERT_FILE, TEACHER_TLS_KEY_FILE) must be "
                f"given together: got a {given} file without a {missing} file"
            )
        return self


def redact_url(url: str) -> str:
    """`url` fit for a log line: the password of its userinfo (`redis://user:pw@host`) and every query value
    whose key holds "password" (`?password=pw`, `ssl_password=`) replaced by `***`."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if "password" in query.lower():
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if "password" in k.lower() else v) for k, v in pairs], safe="/*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def in_process_spec(model: str, **overrides) -> EngineSpec:
    """The EngineSpec of an in-process engine over `model` (see `TeacherSettings.in_process`)."""
    return TeacherSettings.in_process(model, **overrides).engine_spec()
