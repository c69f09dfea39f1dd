"""The async Python client of the teacher, used by the trainer and by users.

`score_many` sends a list of requests over one `ScoreStream` call with at most `max_in_flight` outstanding,
matches responses by request id (they may arrive out of order) and returns results in request order as numpy
arrays. Only UNAVAILABLE is retried (a teacher restart, Redis blip, no worker yet): requests are idempotent
by id, so unanswered ones are simply sent again and a late duplicate answer is ignored. Every other failure
raises the matching `TeacherError` (InvalidRequest names the field).

`ClientOptions` holds the client's knobs (in-flight window, deadline, retries, token, message size) with their
one default each; the trainer's `teacher_client` config section is that dataclass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from services.teacher.errors import DeadlineExceeded, TeacherError, Unavailable, from_code
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.types import ModelInfo, ScoreRequest, ScoreResult

_METHOD = "/teacher.v1.Teacher/"
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
TOKEN_ENV = "PREFIX_DISTILL_TEACHER_TOKEN"


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ClientOptions:
    """How a client talks to the teacher; every field has its one default here and a `help` (config reference)."""

    max_in_flight: int = _opt(64, "Requests in flight to the teacher at once (per client: per rank) (>= 1).")
    timeout_s: float = _opt(120.0, "Deadline of one teacher request in seconds (> 0).")
    retries: int = _opt(8, "Retries of a request on UNAVAILABLE (a teacher restart) (>= 0).")
    token: str = _opt(
        "",
        f"Bearer token for the teacher (empty: ${TOKEN_ENV}, else none); never written to a run's config.yaml.",
    )
    max_message_mb: int = _opt(256, "Largest gRPC message sent or received, in MiB (>= 4).")

    def __post_init__(self) -> None:
        for name, ok, rule in (
            ("max_in_flight", self.max_in_flight >= 1, ">= 1"),
            ("timeout_s", self.timeout_s > 0, "> 0"),
            ("retries", self.retries >= 0, ">= 0"),
            ("max_message_mb", self.max_message_mb >= 4, ">= 4"),
        ):
            if not ok:
                raise ValueError(f"`{name}` must be {rule}, got {getattr(self, name)}.")

    @property
    def bearer_token(self) -> str | None:
        """The token actually sent: `token`, else $PREFIX_DISTILL_TEACHER_TOKEN, else None (no auth header)."""
        return self.token or os.environ.get(TOKEN_ENV) or None


def _rpc_error(err: grpc.aio.AioRpcError) -> TeacherError:
    """The TeacherError for a failed call (the field name rides in trailing metadata)."""
    param = ""
    for key, value in err.trailing_metadata() or ():
        if key == "x-error-param":
            param = value
    return from_code(err.code().name, err.details() or err.code().name, param)


class TeacherClient:
    """Async client of one teacher (`grpc://host:port` or `host:port`)."""

    def __init__(self, target: str, options: ClientOptions | None = None, **overrides) -> None:
        """`options` (default: ClientOptions()), with single fields overridden by keyword (e.g. `retries=0`)."""
        self.target = target.removeprefix("grpc://")
        self.options = dataclasses.replace(options or ClientOptions(), **overrides)
        token = self.options.bearer_token
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        n = self.options.max_message_mb * 1024 * 1024
        self._grpc_options = [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]
        self._channel: grpc.aio.Channel | None = None

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _ch(self) -> grpc.aio.Channel:
        if self._channel is None:  # created lazily inside the running event loop
            self._channel = grpc.aio.insecure_channel(self.target, options=self._grpc_options)
        return self._channel

    def _unary(self, name: str, resp):
        return self._ch().unary_unary(
            _METHOD + name,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp.FromString,
        )

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(min(5.0, 0.2 * 2**attempt) * (0.5 + random.random()))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- API -----------------------------------------------------------------------------------------------------
    async def _retrying(self, call, message, timeout_s: float):
        """A unary call, retried with back-off while it fails with UNAVAILABLE (at most `retries` times)."""
        for attempt in range(self.options.retries + 1):
            try:
                return await call(message, timeout=timeout_s, metadata=self.metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE or attempt == self.options.retries:
                    raise _rpc_error(err) from None
            await self._backoff(attempt)
        raise AssertionError("unreachable")

    def _wire(self, request: ScoreRequest) -> pb.ScoreRequest:
        """The request's wire form, with this client's timeout as its deadline unless it has its own."""
        m = request.to_pb()
        if not m.timeout_ms:
            m.timeout_ms = int(self.options.timeout_s * 1000)
        return m

    async def model_info(self) -> ModelInfo:
        """The teacher's ModelInfo (vocabulary, limits, tokenizer fingerprint)."""
        m = await self._retrying(
            self._unary("GetModelInfo", pb.ModelInfo), pb.ModelInfoRequest(), self.options.timeout_s
        )
        return ModelInfo.from_pb(m)

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Waits until the teacher's gRPC health says SERVING (a worker is alive)."""
        from grpc_health.v1 import health_pb2

        check = self._ch().unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            try:
                r = await check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > end:
                raise Unavailable(f"teacher at {self.target} not serving after {timeout_s:.0f}s")
            await asyncio.sleep(0.2)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Scores one request (unary call), retrying UNAVAILABLE."""
        call = self._unary("Score", pb.ScoreResponse)
        return ScoreResult.from_pb(
            await self._retrying(call, self._wire(request), self.options.timeout_s + 5.0)
        )

    async def score_many(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Scores all requests over ScoreStream; results in request order, each `request_id` preserved."""
        tag = uuid.uuid4().hex[:8]
        wire = []
        for i, r in enumerate(requests):
            m = self._wire(r)
            m.request_id = f"{tag}:{i}"  # unique on the wire; the caller's id is restored below
            wire.append(m)
        results: list[ScoreResult | None] = [None] * len(requests)
        remaining = set(range(len(requests)))
        last_err: TeacherError | None = None
        for attempt in range(self.options.retries + 1):
            try:
                last_err = await self._stream_round(wire, remaining, results)
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE:
                    raise _rpc_error(err) from None
                last_err = _rpc_error(err)
            if not remaining:
                break
            if attempt < self.options.retries:
                await self._backoff(attempt)
        if remaining:
            raise last_err or Unavailable(
                f"{len(remaining)} requests unanswered after {self.options.retries} retries"
            )
        for r, res in zip(requests, results, strict=True):
            res.request_id = r.request_id
        return results  # type: ignore[return-value]

    async def _stream_round(self, wire, remaining: set[int], results: list) -> TeacherError | None:
        """One ScoreStream call for the requests still in `remaining`; fills `results` and drains `remaining`.
        Returns the last retryable error seen in-band (or None); raises for any other error."""
        todo = sorted(remaining)
        window = asyncio.Semaphore(self.options.max_in_flight)
        retry_err: TeacherError | None = None

        async def requests_gen():
            for i in todo:
                await window.acquire()
                yield wire[i]

        stream = self._ch().stream_stream(
            _METHOD + "ScoreStream",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ScoreResponse.FromString,
        )
        call = stream(requests_gen(), metadata=self.metadata)
        try:
            for _ in range(len(todo)):
                try:
                    resp = await asyncio.wait_for(call.read(), self.options.timeout_s + 10.0)
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(
                        f"no response from the teacher within {self.options.timeout_s + 10:.0f}s"
                    ) from None
                if resp is grpc.aio.EOF:
                    break
                window.release()
                i = int(resp.request_id.rsplit(":", 1)[1])
                if i not in remaining:
                    continue  # a duplicate of an answer we already have
                if resp.HasField("error"):
                    err = from_code(resp.error.code, resp.error.message, resp.error.param)
                    if resp.error.code == "UNAVAILABLE":
                        retry_err = err
                        continue
                    raise err
                results[i] = ScoreResult.from_pb(resp)
                remaining.discard(i)
        finally:
            call.cancel()
        return retry_err
