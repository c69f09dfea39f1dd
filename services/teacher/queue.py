"""The Redis batch queue between front-ends and workers: the only coupling between them.

Keys (all under the namespace `pd:<name>:`, so one Redis serves several teachers):
  q:<job>       LIST  request ids of one job, oldest first (claimed from the head, reclaimed to the head)
  jobs          ZSET  jobs with queued work; score = service order (lowest is served next: round-robin)
  seq           STRING counter giving the order
  req:<rid>     HASH  payload (ScoreRequest bytes), job, tokens, ctok (completion tokens), pkey (prompt key),
                      tenant, weight (its claims per round), reply, deadline, attempts, last_error
  inflight      ZSET  claimed request ids; score = visibility deadline (ms, Redis clock)
  bell          LIST  doorbell: workers block on it to wake as soon as work arrives
  workers       ZSET  worker id -> last heartbeat (ms)
  reply:<fe>    LIST  reply envelopes for one front-end
  body:<rid>:<n> STRING a large reply envelope (full rows), the reply list holding a reference to it
  stats         HASH  counters: scored (requests a worker ran), expired (dropped past their deadline),
                      withdrawn (taken back by a front-end whose caller gave up)

Every state change is one Lua script (`queue_scripts.py`), so it is atomic and works alike on Redis 6.2 and
7.x (no streams). Claims are round-robin across tenants (the token that queued a request; `weight` requests of
a tenant per round), then across a tenant's jobs, within a token budget,
`max_batch_tokens`: requests x longest prompt + completion, or with a worker that reuses prompts, counting only
the completion of a request whose prompt the batch already holds (batch_cost.py).

Delivery is at-least-once: a claim puts the request in `inflight`; a worker that dies stops extending it,
and the next claim after the visibility timeout puts it back at the head of its job's queue. The request's
hash is the single "not yet answered" marker: `complete` answers only while it exists and deletes it, so a
client never sees two answers. `attempts` counts claims; past `max_tries` the request fails for good with
INTERNAL and the last error recorded. A request whose deadline passes while it is queued is dropped by the next
claim, never scored; a front-end withdraws one whose caller gave up. Hashes expire after deadline + TTL, reply lists after the TTL, lists and
sets empty themselves: Redis memory returns to its baseline when the traffic stops.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from services.teacher.errors import TeacherError, Unavailable, from_code
from services.teacher.queue_scripts import SCRIPTS

# -- Reply envelopes -------------------------------------------------------------------------------------------
# `<rid>\nok <batch_size> <tokens> <queue_ms> <compute_ms>\n<ScoreResponse bytes>` or
# `<rid>\nerr\n<CODE>\t<param>\t<message>`. The stats ride in the header so a front-end can record metrics
# and forward the response bytes untouched, without parsing them. An envelope above `INLINE_REPLY_BYTES` is
# stored under its own key with a plain SET and the reply list gets `<rid>\nref <key>\n`: a script's
# arguments are copied twice more inside Redis, which for full rows (~100 KB a position) cost Redis as much
# CPU as the rest of the trip. The front-end swaps the reference for the envelope (GETDEL) when it reads it.
INLINE_REPLY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ReplyStats:
    batch_size: int
    tokens: int
    queue_ms: float
    compute_ms: float


def encode_ok(rid: str, response: bytes | list, stats: ReplyStats) -> bytes:
    """The reply envelope of a success; `response` is the ScoreResponse bytes, or pieces of them
    (`ScoreResult.wire_parts`) joined here in one copy."""
    head = f"{rid}\nok {stats.batch_size} {stats.tokens} {stats.queue_ms:.3f} {stats.compute_ms:.3f}\n"
    return b"".join([head.encode(), *response]) if isinstance(response, list) else head.encode() + response


def encode_ref(rid: str, key: str) -> bytes:
    return f"{rid}\nref {key}\n".encode()


def reply_ref(envelope: bytes) -> bytes | None:
    """The body key of a reference envelope, else None (without copying a reply's body: every reply passes here)."""
    kind = envelope.find(b"\n") + 1
    if not envelope.startswith(b"ref ", kind):
        return None
    return envelope[kind + 4 : envelope.find(b"\n", kind)]


def encode_err(rid: str, err: TeacherError) -> bytes:
    msg = err.message.replace("\t", " ")
    return f"{rid}\nerr\n{err.code}\t{err.param}\t{msg}".encode()


def decode_reply(envelope: bytes) -> tuple[str, tuple[bytes, ReplyStats] | TeacherError]:
    """(rid, (response bytes, stats)) for a success, (rid, TeacherError) for a failure."""
    rid, kind, body = envelope.split(b"\n", 2)
    if kind.startswith(b"ok"):
        _, b, t, q, c = kind.split(b" ")
        return rid.decode(), (body, ReplyStats(int(b), int(t), float(q), float(c)))
    code, param, message = body.decode(errors="replace").split("\t", 2)
    return rid.decode(), from_code(code, message, param)


@dataclass
class Claimed:
    """A request a worker holds a lease on."""

    rid: str
    payload: bytes
    attempts: int
    reply: str
    deadline_ms: int
    waited_ms: int = 0


@dataclass(frozen=True)
class QueueConfig:
    """Queue parameters shared by front-ends and workers, made from TeacherSettings (no defaults here)."""

    namespace: str
    """Start of every key (`pd:<name>:`, see `TeacherSettings.key_namespace`)."""
    max_pending_per_job: int
    """Requests one job may have queued before `enqueue` refuses."""
    visibility_ms: int
    """A claim not extended or answered within this is reclaimed."""
    max_tries: int
    """Claims before a request fails for good."""
    reply_ttl_ms: int
    """Lifetime of reply lists (and of request hashes past their deadline)."""
    worker_ttl_ms: int
    """A worker not heard from within this counts as dead."""

    @classmethod
    def from_settings(cls, s) -> QueueConfig:
        return cls(
            namespace=s.key_namespace(),
            max_pending_per_job=s.max_pending_per_job,
            visibility_ms=int(s.visibility_timeout_s * 1000),
            max_tries=s.max_tries,
            reply_ttl_ms=int(s.result_ttl_s * 1000),
            worker_ttl_ms=int(s.worker_ttl_s * 1000),
        )

    def key(self, name: str) -> str:
        return self.namespace + name


class WorkerQueue:
    """The worker's side (synchronous redis-py): claim, complete, nack, extend, heartbeat."""

    def __init__(self, url: str, cfg: QueueConfig) -> None:
        self.cfg = cfg
        self.redis = redis.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=10
        )
        self._s = {name: self.redis.register_script(src) for name, src in SCRIPTS.items()}

    def claim(self, budget_tokens: int, max_n: int, reuse: bool = False) -> list[Claimed]:
        """Leases a fair batch of at most `max_n` requests within `budget_tokens`, costed as batch_cost.BatchCost
        does (`reuse`: the worker computes each prompt once per batch)."""
        c = self.cfg
        flat = self._s["claim"](
            args=[c.namespace, budget_tokens, max_n, c.visibility_ms, c.max_tries, c.reply_ttl_ms, int(reuse)]
        )
        return [
            Claimed(
                flat[i].decode(),
                flat[i + 1],
                int(flat[i + 2]),
                flat[i + 3].decode(),
                int(flat[i + 4]),
                int(flat[i + 5]),
            )
            for i in range(0, len(flat), 6)
        ]

    def complete(self, item: Claimed, envelope: bytes) -> bool:
        """Answers one request; False if it had been answered already (or had expired)."""
        pipe = self.redis.pipeline(transaction=False)
        self._answer(pipe, item, envelope)
        return bool(pipe.execute()[-1])

    def complete_many(self, items: list[tuple[Claimed, bytes]], scored: int = 0) -> None:
        """Answers several requests in one round trip (a pipeline of `complete` scripts) and adds `scored`
        (requests the engine ran) to the `stats` counters."""
        pipe = self.redis.pipeline(transaction=False)
        for item, envelope in items:
            self._answer(pipe, item, envelope)
        if scored:
            pipe.hincrby(self.cfg.key("stats"), "scored", scored)
        pipe.execute()

    def _answer(self, pipe, item: Claimed, envelope: bytes) -> None:
        """Queues the `complete` script on `pipe`; a large envelope goes under its own key first (see
        INLINE_REPLY_BYTES). A worker that dies between the two leaves a body key that expires."""
        c, body_key = self.cfg, ""
        if len(envelope) > INLINE_REPLY_BYTES:
            body_key = c.key(f"body:{item.rid}:{uuid.uuid4().hex[:8]}")  # per answer: a rival's is its own
            pipe.set(body_key, envelope, px=c.reply_ttl_ms)
            envelope = encode_ref(item.rid, body_key)
        self._s["complete"](
            args=[c.namespace, item.rid, item.reply, envelope, c.reply_ttl_ms, body_key], client=pipe
        )

    def stats(self) -> dict[str, int]:
        """The queue's counters (scored, expired, withdrawn) since the namespace was created."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.cfg.key("stats")).items()}

    def nack(self, item: Claimed, reason: str) -> int:
        """Hands a request back (requeued, or failed for good after max_tries). Returns 1 requeued, 2 failed."""
        c = self.cfg
        return int(self._s["nack"](args=[c.namespace, item.rid, reason, c.max_tries, c.reply_ttl_ms]))

    def extend(self, rids: list[str]) -> int:
        """Pushes the visibility deadline of these claimed requests (a batch still being computed)."""
        if not rids:
            return 0
        return int(self._s["extend"](args=[self.cfg.namespace, self.cfg.visibility_ms, *rids]))

    def heartbeat(self, worker_id: str) -> None:
        self._s["heartbeat"](args=[self.cfg.namespace, worker_id, self.cfg.worker_ttl_ms])

    def live_workers(self) -> list[str]:
        """Ids (host:pid) of the workers heard from within the worker TTL."""
        ids = self._s["live_workers"](args=[self.cfg.namespace, self.cfg.worker_ttl_ms])
        return [w.decode() for w in ids]

    def leave(self, worker_id: str) -> None:
        self.redis.zrem(self.cfg.key("workers"), worker_id)

    def wait_for_work(self, timeout_s: float) -> bool:
        """Blocks on the doorbell up to `timeout_s`; True if it rang."""
        return self.redis.blpop([self.cfg.key("bell")], timeout=timeout_s) is not None

    def queued(self) -> int:
        """Requests waiting to be claimed, over all jobs."""
        return sum(int(n) for n in self._s["depths"](args=[self.cfg.namespace])[1::2])

    def close(self) -> None:
        self.redis.close()


class FrontendQueue:
    """The front-end's side (redis.asyncio): enqueue, read replies, health and depth queries."""

    def __init__(self, url: str, cfg: QueueConfig) -> None:
        self.cfg = cfg
        # A bounded pool: thousands of concurrent submits share a few connections instead of opening one each
        # (every connection costs Redis memory and a file descriptor). A submit waits for a free connection as
        # long as it takes (the request's deadline bounds it, in the front-end): a busy pool is back-pressure,
        # not a Redis outage.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=16,
            timeout=None,
            socket_timeout=5,
            socket_connect_timeout=2,
            health_check_interval=10,
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        # A separate connection for the blocking reply read, so it never delays enqueues.
        self.blocking = aioredis.Redis.from_url(url, socket_connect_timeout=2, health_check_interval=10)
        # The health probe below shares the pool: it waits for a connection like a submit (never a pool timeout
        # taken for an outage), and its pings clear connections a Redis restart left stale.
        self._s = {name: self.redis.register_script(src) for name, src in SCRIPTS.items()}

    async def enqueue(
        self,
        rid: str,
        payload: bytes,
        job: str,
        tokens: int,
        reply: str,
        deadline_ms: int,
        completion_tokens: int | None = None,
        prompt_key: bytes = b"",
        tenant: str = "",
        weight: int = 1,
    ) -> bool:
        """Queues a request of `tokens` (prompt + completion); False when the job already has
        max_pending_per_job queued. `completion_tokens` and `prompt_key` (batch_cost.prompt_key) let a worker that
        reuses prompts claim more requests of one prompt (without them the request counts as one with a prompt of
        its own). `tenant` (the caller's token) is what batching is fair across first; "" makes the job its own.
        `weight` is the tenant's claims per round (auth.Principal.weight)."""
        c = self.cfg
        ttl = max(1, deadline_ms - int(time.time() * 1000)) + c.reply_ttl_ms
        ctok = tokens if completion_tokens is None else completion_tokens
        ok = await self._s["enqueue"](
            args=[
                c.namespace,
                rid,
                payload,
                job,
                tokens,
                reply,
                deadline_ms,
                c.max_pending_per_job,
                ttl,
                ctok,
                prompt_key.hex(),
                tenant,
                weight,
            ]
        )
        return bool(ok)

    async def read_replies(self, reply: str, timeout_s: float, max_items: int = 256) -> list[bytes]:
        """Waits up to `timeout_s` for reply envelopes and returns all that are ready (at most `max_items`)."""
        first = await self.blocking.blpop([reply], timeout=timeout_s)
        if first is None:
            return []
        rest = await self.blocking.lpop(reply, max_items - 1) or []
        envelopes = [first[1], *rest]
        refs = [(i, key) for i, env in enumerate(envelopes) if (key := reply_ref(env)) is not None]
        if refs:  # large replies: fetched (and deleted) in one round trip
            pipe = self.blocking.pipeline(transaction=False)
            for _, key in refs:
                pipe.getdel(key)
            for (i, _), body in zip(refs, await pipe.execute(), strict=True):
                rid = envelopes[i].split(b"\n", 1)[0].decode()
                gone = Unavailable("the reply expired in Redis before it was read; retry.")
                envelopes[i] = body if body is not None else encode_err(rid, gone)
        return envelopes

    async def cancel(self, rid: str) -> bool:
        """Withdraws a queued request nobody waits for any more; False if a worker holds it or it is gone."""
        return bool(await self._s["cancel"](args=[self.cfg.namespace, rid]))

    async def touch(self, reply: str) -> None:
        await self.redis.pexpire(reply, self.cfg.reply_ttl_ms)

    async def live_workers(self) -> int:
        return len(await self._s["live_workers"](args=[self.cfg.namespace, self.cfg.worker_ttl_ms]))

    async def depths(self) -> dict[str, int]:
        """Queued (unclaimed) requests per job."""
        flat = await self._s["depths"](args=[self.cfg.namespace])
        return {job.decode(): int(n) for job, n in zip(flat[::2], flat[1::2], strict=True)}

    async def inflight(self) -> int:
        return int(await self.redis.zcard(self.cfg.key("inflight")))

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()
        await self.blocking.aclose()
