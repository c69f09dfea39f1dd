"""The async Python client of the teacher, used by the trainer and by users: the one retry policy.

`score_many` sends a list of requests over one `ScoreStream` call with at most `max_in_flight` outstanding,
matches responses by request id (they may arrive out of order) and returns results in request order as numpy
arrays. Retries happen here and nowhere else, request by request:
- an in-band UNAVAILABLE, or RESOURCE_EXHAUSTED with a retry-after hint (a full job queue, a spent quota), sends
  that one request again after the hint (else an exponential back-off capped at BACKOFF_CAP_S) for as long as
  its `retry_budget_s` lasts (a time from its first failure, not a count: a Redis failover of a minute is
  ridden out whatever the back-off); the others go on meanwhile;
- a broken stream (a front-end restart, a Redis outage) is reopened after a back-off and every unanswered request
  is sent again, for `retry_budget_s` without an answer;
- any other error is final for its request only: the others are still answered, then the first error is raised
  (or, with `return_exceptions=True`, each failed request's error takes its place in the results).
The server does not deduplicate by request id: a resent request is scored again, which is safe (scoring has no
side effects); an answer to a request that already has one is dropped here and counted in `stats.duplicates`.

`ClientOptions` holds the client's knobs (in-flight window, deadline, retry budget, token, TLS, message size) with
their one default each; the trainer's `teacher_client` config section is that dataclass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.teacher.errors import (
    CORE_INTERNAL_DETAILS,
    PARAM_TRAILER,
    RETRY_AFTER_TRAILER,
    STREAM_ACCEPTED_HEADER,
    DeadlineExceeded,
    TeacherError,
    Unavailable,
    from_code,
    retryable,
)
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.types import ModelInfo, ScoreRequest, ScoreResult

_METHOD = "/teacher.v1.Teacher/"
TOKEN_ENV = "PREFIX_DISTILL_TEACHER_TOKEN"
MAX_DELAY_S = 30.0  # the longest wait before a retry, whatever the server hints
BACKOFF_START_S = 0.2  # the first back-off without a hint; it doubles per retry ...
BACKOFF_CAP_S = 2.0  # ... up to this (a restart of Redis or of a front-end takes about a second)


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ClientOptions:
    """How a client talks to the teacher; every field has its one default here and a `help` (config reference)."""

    max_in_flight: int = _opt(64, "Requests in flight to the teacher at once (per client: per rank) (>= 1).")
    timeout_s: float = _opt(120.0, "Deadline of one teacher request in seconds (> 0).")
    retry_budget_s: float = _opt(
        120.0,
        "How long one request is retried on UNAVAILABLE or RESOURCE_EXHAUSTED with a retry-after hint (and a "
        "broken stream reopened without an answer), in seconds from its first failure, with a back-off of "
        f"{BACKOFF_START_S} s doubling to {BACKOFF_CAP_S} s (+-50% jitter); the last retry is sent when it ends "
        "(>= 0; 0: never retry). The default rides out a Redis failover or restart of a minute or two.",
    )
    retries: int = _opt(
        1000,
        "A bound on the number of those retries as well (>= 0; 0: never retry); the default leaves the bound to "
        "retry_budget_s (kept for configs that set a count).",
    )
    token: str = _opt(
        "",
        f"Bearer token for the teacher (empty: ${TOKEN_ENV}, else none); never written to a run's config.yaml.",
    )
    ca_file: str = _opt(
        "",
        "PEM file of the CA that signed the teacher's TLS certificate: talk TLS (so does a grpcs:// target, "
        "with the system's CAs).",
    )
    max_message_mb: int = _opt(256, "Largest gRPC message sent or received, in MiB (>= 4).")

    def __post_init__(self) -> None:
        for name, ok, rule in (
            ("max_in_flight", self.max_in_flight >= 1, ">= 1"),
            ("timeout_s", self.timeout_s > 0, "> 0"),
            ("retry_budget_s", self.retry_budget_s >= 0, ">= 0"),
            ("retries", self.retries >= 0, ">= 0"),
            ("max_message_mb", self.max_message_mb >= 4, ">= 4"),
        ):
            if not ok:
                raise ValueError(f"`{name}` must be {rule}, got {getattr(self, name)}.")

    @property
    def bearer_token(self) -> str | None:
        """The token actually sent: `token`, else $PREFIX_DISTILL_TEACHER_TOKEN, else None (no auth header)."""
        return self.token or os.environ.get(TOKEN_ENV) or None


@dataclass
class ClientStats:
    """What this client did on the wire since it was made (read by the trainer's metrics and the fault suite)."""

    sent: int = 0
    """ScoreRequest messages sent (first tries and retries)."""
    answered: int = 0
    """Requests answered with scores."""
    retried: int = 0
    """Requests sent again (in-band back-pressure or UNAVAILABLE, or unanswered on a broken stream)."""
    reconnects: int = 0
    """Streams reopened after a broken one."""
    duplicates: int = 0
    """Answers to a request that already had one (dropped)."""


def _hint_s(milliseconds) -> float | None:
    ms = int(milliseconds or 0)
    return ms / 1000.0 if ms > 0 else None


def _rpc_error(err: grpc.aio.AioRpcError) -> TeacherError:
    """The TeacherError for a failed call (field name and retry-after hint ride in trailing metadata). A call
    the server cancelled (it is shutting down), or one whose write failed as it ended (grpcio's local INTERNAL,
    see CORE_INTERNAL_DETAILS), counts as UNAVAILABLE: the stream broke, the requests were not refused."""
    meta = dict(err.trailing_metadata() or ())
    code = err.code().name
    if err.code() == grpc.StatusCode.CANCELLED or (
        err.code() == grpc.StatusCode.INTERNAL and err.details() == CORE_INTERNAL_DETAILS
    ):
        code = "UNAVAILABLE"
    return from_code(
        code,
        err.details() or err.code().name,
        meta.get(PARAM_TRAILER, ""),
        _hint_s(meta.get(RETRY_AFTER_TRAILER)),
    )


def _in_band_error(resp: pb.ScoreResponse) -> TeacherError:
    e = resp.error
    return from_code(e.code, e.message, e.param, _hint_s(e.retry_after_ms))


def retry_delay(attempt: int, err: TeacherError | None, rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry number `attempt` (1, 2, ...): the server's hint when it gave one (plus up to 20%
    jitter, at most MAX_DELAY_S), else an exponential back-off from BACKOFF_START_S to BACKOFF_CAP_S with +-50%
    jitter (a restart of Redis or of a front-end takes about a second: retrying every few seconds finds it back
    soon). `rand` gives the jitter (uniform in [0, 1))."""
    if err is not None and err.retry_after_s is not None:
        return min(MAX_DELAY_S, err.retry_after_s * (1.0 + 0.2 * rand()))
    return min(BACKOFF_CAP_S, BACKOFF_START_S * 2 ** min(attempt - 1, 30)) * (0.5 + rand())


@dataclass
class RetryBudget:
    """The retries left to one request (or to one stream's reopenings without an answer): a time, `budget_s`
    from the first failure, and a count, `retries`. `next_delay` says how long to wait before the next retry,
    or None when the budget is spent; the retry that would start past the budget's end is sent at its end
    instead, so the whole budget is used."""

    budget_s: float
    retries: int
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random
    attempts: int = 0
    """Retries granted so far."""
    since: float | None = None
    """Clock time of the first failure (None before it)."""

    def next_delay(self, err: TeacherError | None) -> float | None:
        now = self.clock()
        if self.since is None:
            self.since = now
        left = self.budget_s - (now - self.since)
        if self.attempts >= self.retries or left <= 0:
            return None
        self.attempts += 1
        return min(retry_delay(self.attempts, err, self.rand), left)

    def reset(self) -> None:
        """Progress was made (a stream answered): the next failure starts a budget of its own."""
        self.attempts, self.since = 0, None


class _Batch:
    """The state of one `score_many`: wire messages, results or errors, and retries per request."""

    def __init__(
        self, requests: Sequence[ScoreRequest], wire: list[pb.ScoreRequest], budget: Callable[[], RetryBudget]
    ) -> None:
        self.requests, self.wire = requests, wire
        self.results: list[ScoreResult | TeacherError | None] = [None] * len(requests)
        self.open = set(range(len(requests)))
        self._budget = budget
        self.budgets: dict[int, RetryBudget] = {}  # of the requests that failed in-band at least once
        self.progressed = False

    def budget(self, i: int) -> RetryBudget:
        if i not in self.budgets:
            self.budgets[i] = self._budget()
        return self.budgets[i]

    def settle(self, i: int, outcome: ScoreResult | TeacherError) -> None:
        self.results[i] = outcome
        self.open.discard(i)
        self.progressed = True

    def fail_open(self, err: TeacherError) -> None:
        for i in sorted(self.open):
            self.settle(i, err)

    def outcome(self, return_exceptions: bool) -> list:
        for r, res in zip(self.requests, self.results, strict=True):
            if isinstance(res, ScoreResult):
                res.request_id = r.request_id
            elif not return_exceptions:
                raise res
        return self.results


class TeacherClient:
    """Async client of one teacher (`grpc://host:port`, `grpcs://host:port` for TLS, or `host:port`)."""

    def __init__(self, target: str, options: ClientOptions | None = None, **overrides) -> None:
        """`options` (default: ClientOptions()), with single fields overridden by keyword (e.g. `retries=0`)."""
        self.tls = target.startswith("grpcs://")
        self.target = target.removeprefix("grpcs://").removeprefix("grpc://")
        self.options = dataclasses.replace(options or ClientOptions(), **overrides)
        self.tls = self.tls or bool(self.options.ca_file)
        token = self.options.bearer_token
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        n = self.options.max_message_mb * 1024 * 1024
        self._grpc_options = [
            ("grpc.max_send_message_length", n),
            ("grpc.max_receive_message_length", n),
            # gRPC's own reconnect back-off grows to minutes; cap it like ours, or a channel whose teacher was
            # down for 10 s waits seconds more after the teacher is back before it even tries to connect.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self._channel: grpc.aio.Channel | None = None
        self.stats = ClientStats()

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _ch(self) -> grpc.aio.Channel:
        if self._channel is None:  # created lazily inside the running event loop
            if self.tls:
                ca = Path(self.options.ca_file).read_bytes() if self.options.ca_file else None
                creds = grpc.ssl_channel_credentials(root_certificates=ca)
                self._channel = grpc.aio.secure_channel(self.target, creds, options=self._grpc_options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._grpc_options)
        return self._channel

    def _unary(self, name: str, resp):
        return self._ch().unary_unary(
            _METHOD + name,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp.FromString,
        )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- API -----------------------------------------------------------------------------------------------------
    def retry_budget(self) -> RetryBudget:
        """A fresh budget of retries under this client's options."""
        return RetryBudget(self.options.retry_budget_s, self.options.retries)

    async def _retrying(self, call, message, timeout_s: float):
        """A unary call, retried while it fails with a retryable error and its retry budget lasts."""
        budget = self.retry_budget()
        while True:
            try:
                return await call(message, timeout=timeout_s, metadata=self.metadata)
            except grpc.aio.AioRpcError as rpc_err:
                err = _rpc_error(rpc_err)
                delay = budget.next_delay(err) if retryable(err) else None
                if delay is None:
                    raise err from None
            self.stats.retried += 1
            await asyncio.sleep(delay)

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
        """Scores one request (unary call), with the retry policy of the module docstring."""
        call = self._unary("Score", pb.ScoreResponse)
        self.stats.sent += 1
        res = ScoreResult.from_pb(
            await self._retrying(call, self._wire(request), self.options.timeout_s + 5.0)
        )
        self.stats.answered += 1
        return res

    async def score_many(
        self, requests: Sequence[ScoreRequest], *, return_exceptions: bool = False
    ) -> list[ScoreResult]:
        """Scores all requests over ScoreStream; results in request order, each `request_id` preserved. A request
        that fails for good raises its error once every other request is settled, or with `return_exceptions`
        stands in the list in place of its result."""
        tag = uuid.uuid4().hex[:8]
        wire = []
        for i, r in enumerate(requests):
            m = self._wire(r)
            m.request_id = f"{tag}:{i}"  # unique on the wire; the caller's id is restored at the end
            wire.append(m)
        batch = _Batch(requests, wire, self.retry_budget)
        reopen = self.retry_budget()  # broken streams in a row that answered nothing
        while batch.open:
            batch.progressed = False
            try:
                err = await self._stream(batch)
            except grpc.aio.AioRpcError as rpc_err:
                err = _rpc_error(rpc_err)
            if not batch.open:
                break
            assert err is not None
            if batch.progressed:
                reopen.reset()
            delay = reopen.next_delay(err) if retryable(err) else None
            if delay is None:
                batch.fail_open(err)
                break
            self.stats.reconnects += 1
            self.stats.retried += len(batch.open)
            await asyncio.sleep(delay)
        return batch.outcome(return_exceptions)

    async def _stream(self, batch: _Batch) -> TeacherError | None:
        """One ScoreStream call for the open requests of `batch`, retrying in-band failures per request. Returns
        None once every request is settled, else (or raises, as AioRpcError) why it ended early."""
        loop = asyncio.get_running_loop()
        todo: asyncio.Queue[int | None] = asyncio.Queue()
        for i in sorted(batch.open):
            todo.put_nowait(i)
        window = asyncio.Semaphore(self.options.max_in_flight)
        waiting: dict[int, asyncio.TimerHandle] = {}  # requests scheduled to be sent again

        async def requests_gen():
            # Write nothing until the server has accepted the stream (or ended it): a write racing a refusal
            # would replace the server's status (say UNAUTHENTICATED) with a local INTERNAL.
            if STREAM_ACCEPTED_HEADER not in dict(await call.initial_metadata()):
                await call.code()  # refused: wait for the status, so that nothing is written
                return
            while (i := await todo.get()) is not None:
                await window.acquire()
                self.stats.sent += 1
                yield batch.wire[i]

        def resend(i: int) -> None:
            waiting.pop(i, None)
            todo.put_nowait(i)

        stream = self._ch().stream_stream(
            _METHOD + "ScoreStream",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ScoreResponse.FromString,
        )
        call = stream(requests_gen(), metadata=self.metadata)
        try:
            while batch.open:
                patience = self.options.timeout_s + 10.0 + (MAX_DELAY_S if waiting else 0.0)
                try:
                    resp = await asyncio.wait_for(call.read(), patience)
                except asyncio.TimeoutError:
                    return DeadlineExceeded(f"no response from the teacher within {patience:.0f}s")
                if resp is grpc.aio.EOF:
                    return Unavailable(
                        f"the teacher ended the stream with {len(batch.open)} requests unanswered"
                    )
                window.release()
                self._receive(
                    batch, resp, lambda i, delay: waiting.setdefault(i, loop.call_later(delay, resend, i))
                )
            return None
        finally:
            for handle in waiting.values():
                handle.cancel()
            todo.put_nowait(None)
            call.cancel()

    def _receive(self, batch: _Batch, resp: pb.ScoreResponse, schedule) -> None:
        """Settles the request `resp` answers, or schedules it again (`schedule(i, delay)`) for a retryable
        in-band error with attempts left."""
        head, _, index = resp.request_id.rpartition(":")
        i = int(index) if index.isdigit() else -1
        if not head or not 0 <= i < len(batch.wire) or batch.wire[i].request_id != resp.request_id:
            return  # not ours (cannot happen on a private stream)
        if i not in batch.open:
            self.stats.duplicates += 1
            return
        if not resp.HasField("error"):
            self.stats.answered += 1
            batch.settle(i, ScoreResult.from_pb(resp))
            return
        err = _in_band_error(resp)
        delay = batch.budget(i).next_delay(err) if retryable(err) else None
        if delay is not None:
            self.stats.retried += 1
            schedule(i, delay)
            return
        batch.settle(i, err)
