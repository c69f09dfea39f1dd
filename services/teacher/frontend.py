"""The front-end core shared by the gRPC and HTTP transports: validate, queue to Redis, await the reply.

`Dispatcher.submit` is the whole request path: the caller's scope and quotas (`auth`, `quota`), model-dependent
validation (so nothing invalid is queued), fail-fast checks (Redis reachable, a worker alive), enqueue under the
job's pending bound with the request's deadline (the tighter of its `timeout_ms` and the transport's own
deadline), then wait for the reply envelope that a background task reads from this front-end's reply list. A
caller that gives up (a cancelled gRPC call) takes its request out of the queue, and workers drop requests whose
deadline has passed: neither costs a forward pass. It also runs the health probe that drives gRPC health,
/healthz and the queue gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

import redis

from services.teacher import metrics
from services.teacher.auth import Principal, TokenTable
from services.teacher.batch_cost import prompt_key
from services.teacher.errors import DeadlineExceeded, QueueFull, TeacherError, Unavailable
from services.teacher.queue import FrontendQueue, QueueConfig, ReplyStats, decode_reply
from services.teacher.quota import Quotas
from services.teacher.settings import TeacherSettings
from services.teacher.types import ModelInfo, ScoreRequest
from services.teacher.validation import validate_request

log = logging.getLogger("prefix_distill.frontend")


class Dispatcher:
    """Submits requests to the queue and resolves them from replies. Create, `await start()`, use, `await stop()`."""

    def __init__(self, settings: TeacherSettings, info: ModelInfo, tokenizer=None) -> None:
        self.settings = settings
        self.info = info
        self.tokenizer = tokenizer
        self.tokens = TokenTable.from_settings(settings)
        self.quotas = Quotas()
        self.qcfg = QueueConfig.from_settings(settings)
        self.queue = FrontendQueue(settings.redis_url, self.qcfg)
        self.frontend_id = uuid.uuid4().hex[:12]
        self.reply_key = self.qcfg.key(f"reply:{self.frontend_id}")
        self.pending: dict[str, asyncio.Future] = {}
        self.redis_ok = False
        self.live_workers = 0
        self.health_listeners: list[Callable[[bool], object]] = []
        self._tasks: list[asyncio.Task] = []
        self._withdrawing: set[asyncio.Task] = set()
        self._rate = metrics.TokenRate()
        self._jobs_shown: set[str] = set()
        self._serving: bool | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._probe()
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._health_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._fail_pending(Unavailable("the teacher front-end is shutting down; retry."))
        with contextlib.suppress(Exception):
            await self.queue.close()

    @property
    def serving(self) -> bool:
        return self.redis_ok and self.live_workers > 0

    # -- request path ------------------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of an `Authorization` value (Unauthenticated when auth is on and it is not valid)."""
        return self.tokens.authenticate(authorization)

    async def submit(
        self,
        req: ScoreRequest,
        transport: str = "grpc",
        wire: bytes | None = None,
        *,
        principal: Principal | None = None,
        deadline_s: float | None = None,
    ) -> tuple[bytes, ReplyStats]:
        """Queues `req` and returns (ScoreResponse bytes, worker stats); raises a TeacherError on failure.

        `principal` is the authenticated caller (None: the anonymous caller, refused when auth is on);
        `deadline_s` the seconds the transport still waits (a gRPC deadline), None for none. `wire` (the
        bytes `req` was parsed from, when the transport has them) is never queued: what is queued is `req`
        re-encoded, its known fields only (unknown fields padded into a message are dropped here), with the
        caller's prompt-cache scope.
        """
        t0 = time.perf_counter()
        code = "OK"
        try:
            who = principal or self.authenticate(None)
            who.authorize(req.job_id)
            req.cache_scope = "" if self.settings.share_prompt_cache else who.name
            payload = req.to_pb().SerializeToString()  # known fields only, whatever `wire` held
            with self.quotas.admit(who, req.num_tokens, len(payload)):
                out = await self._submit(req, payload, deadline_s, who.name, who.weight)
            metrics.TOKENS.inc(out[1].tokens)
            self._rate.add(out[1].tokens)
            metrics.QUEUE_WAIT.observe(out[1].queue_ms / 1000.0)
            metrics.COMPUTE.observe(out[1].compute_ms / 1000.0)
            metrics.BATCH_SIZE.observe(out[1].batch_size)
            return out
        except TeacherError as err:
            code = err.code
            raise
        finally:
            metrics.REQUESTS.labels(transport=transport, code=code).inc()
            metrics.LATENCY.labels(transport=transport).observe(time.perf_counter() - t0)

    def _timeout_s(self, req: ScoreRequest, deadline_s: float | None) -> float:
        """Seconds this request may take: its `timeout_ms` (else the default), within the transport's deadline."""
        timeout_s = req.timeout_ms / 1000.0 if req.timeout_ms else self.settings.request_timeout_s
        if deadline_s is not None:
            timeout_s = min(timeout_s, deadline_s)
        if timeout_s <= 0:
            raise DeadlineExceeded("the request's deadline had passed when it arrived.")
        return timeout_s

    async def _submit(
        self,
        req: ScoreRequest,
        payload: bytes,
        deadline_s: float | None,
        tenant: str = "",
        weight: int = 1,
    ) -> tuple[bytes, ReplyStats]:
        validate_request(req, self.info)
        if not self.redis_ok:
            raise Unavailable("Redis is unreachable; the teacher cannot queue work. Retry later.")
        if self.live_workers == 0:
            raise Unavailable("no teacher worker is alive; retry when one has started.")
        timeout_s = self._timeout_s(req, deadline_s)
        deadline_ms = int((time.time() + timeout_s) * 1000)
        rid = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        metrics.PENDING.set(len(self.pending))
        try:
            enqueue = self.queue.enqueue(
                rid,
                payload,
                req.job_id,
                req.num_tokens,
                self.reply_key,
                deadline_ms,
                completion_tokens=req.completion_token_ids.size,
                prompt_key=prompt_key(req.prompt_token_ids, req.cache_scope),
                tenant=tenant,
                weight=weight,
            )
            try:  # waits for a pooled connection under a burst: bounded by the request's own deadline
                accepted = await asyncio.wait_for(enqueue, timeout_s)
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"not even queued within {timeout_s:.1f}s (front-end busy).") from None
            except redis.RedisError as err:
                self.redis_ok = False
                raise Unavailable(f"Redis is unreachable ({err}); retry later.") from None
            if not accepted:
                raise QueueFull(
                    f"job {req.job_id!r} already has {self.qcfg.max_pending_per_job} pending requests; "
                    "slow down or retry later.",
                    "job_id",
                    retry_after_s=self.settings.retry_after_s,
                )
            try:
                body = await asyncio.wait_for(fut, timeout_s)
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"no answer within {timeout_s:.1f}s.") from None
            except asyncio.CancelledError:
                self._withdraw(rid)  # the caller gave up: no forward pass for nobody
                raise
        finally:
            self.pending.pop(rid, None)
            metrics.PENDING.set(len(self.pending))
        if isinstance(body, TeacherError):
            raise body
        return body

    def _withdraw(self, rid: str) -> None:
        """Takes a request nobody waits for out of the queue, in the background (best effort)."""
        task = asyncio.get_running_loop().create_task(self.queue.cancel(rid))
        self._withdrawing.add(task)
        task.add_done_callback(self._withdrawing.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a Redis blip: it expires anyway

    # -- background --------------------------------------------------------------------------------------------
    def _fail_pending(self, err: TeacherError) -> None:
        for fut in list(self.pending.values()):
            if not fut.done():
                fut.set_exception(err)

    async def _listen(self) -> None:
        """Reads reply envelopes and resolves the matching futures; duplicates and strangers are dropped."""
        backoff = 0.1
        while True:
            try:
                envelopes = await self.queue.read_replies(self.reply_key, 1.0)
                backoff = 0.1
            except (redis.RedisError, OSError) as err:
                log.warning("reply listener lost Redis (%s)", err)
                self.redis_ok = False
                # Requests queued before an outage may be gone (Redis restarted empty): let clients retry.
                self._fail_pending(Unavailable("lost the connection to Redis while waiting; retry."))
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)
                continue
            for env in envelopes:
                rid, body = decode_reply(env)
                fut = self.pending.get(rid)
                if fut is not None and not fut.done():
                    fut.set_result(body)

    async def _probe(self) -> None:
        try:
            await self.queue.ping()
            self.live_workers = await self.queue.live_workers()
            await self.queue.touch(self.reply_key)
            self._jobs_shown = metrics.set_depths(
                await self.queue.depths(), self._jobs_shown, self.settings.max_metric_jobs
            )
            metrics.INFLIGHT.set(await self.queue.inflight())
            self.redis_ok = True
        except (redis.RedisError, OSError):
            if self.redis_ok:
                log.warning("Redis is unreachable")
            self.redis_ok = False
        metrics.REDIS_UP.set(int(self.redis_ok))
        metrics.WORKERS.set(self.live_workers)
        metrics.TOKENS_PER_S.set(self._rate.rate())
        if self.serving != self._serving:
            self._serving = self.serving
            for listener in self.health_listeners:
                res = listener(self.serving)
                if asyncio.iscoroutine(res):
                    await res

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self._probe()
