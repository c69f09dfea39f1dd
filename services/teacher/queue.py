"""The Redis batch queue between front-ends and workers: the only coupling between them.

Keys (prefix `pd:<model>:` so one Redis serves several teachers):
  q:<job>       LIST  request ids of one job, oldest first (claimed from the head, reclaimed to the head)
  jobs          ZSET  jobs with queued work; score = service order (lowest is served next: round-robin)
  seq           STRING counter giving the order
  req:<rid>     HASH  payload (ScoreRequest bytes), job, tokens, reply, deadline, attempts, last_error
  inflight      ZSET  claimed request ids; score = visibility deadline (ms, Redis clock)
  bell          LIST  doorbell: workers block on it to wake as soon as work arrives
  workers       ZSET  worker id -> last heartbeat (ms)
  reply:<fe>    LIST  reply envelopes for one front-end

Every state change is one Lua script, so it is atomic and works alike on Redis 6.2 and 7.x (no streams).
Delivery is at-least-once: a claim puts the request in `inflight`; a worker that dies stops extending it,
and the next claim after the visibility timeout puts it back at the head of its job's queue. The request's
hash is the single "not yet answered" marker: `complete` answers only while it exists and deletes it, so a
client never sees two answers. `attempts` counts claims; past `max_tries` the request fails for good with
INTERNAL and the last error recorded. Hashes expire after deadline + TTL, reply lists after the TTL, lists and
sets empty themselves: Redis memory returns to its baseline when the traffic stops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from services.teacher.errors import TeacherError, from_code

# -- Lua ------------------------------------------------------------------------------------------------------
# Shared helpers prepended to every script. Times are Redis' own clock (ms), so workers on several machines
# agree on visibility deadlines.
_LUA_PRELUDE = """
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function activate(job)
  -- A job joins the round-robin at the current position: served after those already waiting.
  if not redis.call('ZSCORE', P .. 'jobs', job) then
    local seq = tonumber(redis.call('GET', P .. 'seq') or '0')
    redis.call('ZADD', P .. 'jobs', seq, job)
  end
end
local function ring()
  redis.call('LPUSH', P .. 'bell', '1')
  redis.call('LTRIM', P .. 'bell', 0, 63)
end
local function fail(rid, reply, code, msg, ttl_ms)
  redis.call('RPUSH', reply, rid .. '\\nerr\\n' .. code .. '\\t\\t' .. msg)
  redis.call('PEXPIRE', reply, ttl_ms)
  redis.call('DEL', P .. 'req:' .. rid)
end
"""

# ARGV: prefix, rid, payload, job, tokens, reply, deadline_ms, max_pending, hash_ttl_ms
_ENQUEUE = (
    _LUA_PRELUDE
    + """
local rid, job = ARGV[2], ARGV[4]
local q = P .. 'q:' .. job
if redis.call('LLEN', q) >= tonumber(ARGV[8]) then return 0 end
local key = P .. 'req:' .. rid
redis.call('HSET', key, 'payload', ARGV[3], 'job', job, 'tokens', ARGV[5], 'reply', ARGV[6],
           'deadline', ARGV[7], 'attempts', 0, 'enq', now_ms())
redis.call('PEXPIRE', key, tonumber(ARGV[9]))
redis.call('RPUSH', q, rid)
activate(job)
ring()
return 1
"""
)

# ARGV: prefix, budget_tokens, max_n, visibility_ms, max_tries, reply_ttl_ms
# Returns a flat list: rid, payload, attempts, reply, deadline, waited_ms, ... for each claimed request.
_CLAIM = (
    _LUA_PRELUDE
    + """
local budget, max_n, vis = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local max_tries, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
-- 1. Reclaim leases that expired (their worker died or stalled): back to the head of their job's queue.
local expired = redis.call('ZRANGEBYSCORE', P .. 'inflight', '-inf', now, 'LIMIT', 0, 1000)
for _, rid in ipairs(expired) do
  redis.call('ZREM', P .. 'inflight', rid)
  local key = P .. 'req:' .. rid
  local job = redis.call('HGET', key, 'job')
  if job then
    redis.call('HSET', key, 'last_error', 'the worker holding it stopped responding (lease expired)')
    redis.call('LPUSH', P .. 'q:' .. job, rid)
    activate(job)
  end
end
-- 2. Round-robin across jobs, one request per job per round, within the padded token budget.
local out, n, longest, full = {}, 0, 0, false
while n < max_n and not full do
  local jobs = redis.call('ZRANGE', P .. 'jobs', 0, -1)
  if #jobs == 0 then break end
  local progressed = false
  for _, job in ipairs(jobs) do
    if n >= max_n then break end
    local q = P .. 'q:' .. job
    local rid = redis.call('LINDEX', q, 0)
    if not rid then
      redis.call('ZREM', P .. 'jobs', job)
    else
      local key = P .. 'req:' .. rid
      local h = redis.call('HMGET', key, 'payload', 'tokens', 'reply', 'deadline', 'attempts', 'last_error', 'enq')
      if not h[1] then
        redis.call('LPOP', q)  -- its hash expired: nobody waits for it any more
        progressed = true
      else
        local tok = tonumber(h[2])
        local wide = math.max(longest, tok)
        if n > 0 and wide * (n + 1) > budget then
          full = true
          break
        end
        redis.call('LPOP', q)
        local attempts = tonumber(h[5]) + 1
        if attempts > max_tries then
          fail(rid, h[3], 'INTERNAL', 'request failed after ' .. max_tries .. ' attempts; last error: '
               .. (h[6] or 'unknown'), ttl)
        else
          redis.call('HSET', key, 'attempts', attempts)
          redis.call('ZADD', P .. 'inflight', now + vis, rid)
          table.insert(out, rid)
          table.insert(out, h[1])
          table.insert(out, attempts)
          table.insert(out, h[3])
          table.insert(out, h[4])
          table.insert(out, now - tonumber(h[7] or now))
          n = n + 1
          longest = wide
        end
        redis.call('ZADD', P .. 'jobs', redis.call('INCR', P .. 'seq'), job)
        if redis.call('LLEN', q) == 0 then redis.call('ZREM', P .. 'jobs', job) end
        progressed = true
      end
    end
  end
  if not progressed then break end
end
return out
"""
)

# ARGV: prefix, rid, reply, envelope, reply_ttl_ms. Returns 1 if this answer was delivered, 0 if the request
# had already been answered (a duplicate from a reclaimed lease) or had expired.
_COMPLETE = (
    _LUA_PRELUDE
    + """
local rid = ARGV[2]
local key = P .. 'req:' .. rid
local job = redis.call('HGET', key, 'job')
if not job then return 0 end
if redis.call('ZREM', P .. 'inflight', rid) == 0 then
  redis.call('LREM', P .. 'q:' .. job, 1, rid)  -- it was reclaimed and requeued meanwhile
  if redis.call('LLEN', P .. 'q:' .. job) == 0 then redis.call('ZREM', P .. 'jobs', job) end
end
redis.call('DEL', key)
redis.call('RPUSH', ARGV[3], ARGV[4])
redis.call('PEXPIRE', ARGV[3], tonumber(ARGV[5]))
return 1
"""
)

# ARGV: prefix, rid, reason, max_tries, reply_ttl_ms, count_attempt (1/0). A worker hands a request back:
# requeued at the head of its job's queue, or failed for good once it has used its attempts.
_NACK = (
    _LUA_PRELUDE
    + """
local rid = ARGV[2]
local key = P .. 'req:' .. rid
local h = redis.call('HMGET', key, 'job', 'reply', 'attempts')
if not h[1] then return 0 end
redis.call('ZREM', P .. 'inflight', rid)
local attempts = tonumber(h[3])
if ARGV[6] == '0' then
  attempts = attempts - 1
  redis.call('HSET', key, 'attempts', attempts)
elseif attempts >= tonumber(ARGV[4]) then
  fail(rid, h[2], 'INTERNAL', 'request failed after ' .. attempts .. ' attempts; last error: ' .. ARGV[3],
       tonumber(ARGV[5]))
  return 2
end
redis.call('HSET', key, 'last_error', ARGV[3])
redis.call('LPUSH', P .. 'q:' .. h[1], rid)
activate(h[1])
ring()
return 1
"""
)

# ARGV: prefix, visibility_ms, rid... : pushes the leases of a batch still being computed.
_EXTEND = (
    _LUA_PRELUDE
    + """
local dl = now_ms() + tonumber(ARGV[2])
local n = 0
for i = 3, #ARGV do
  n = n + redis.call('ZADD', P .. 'inflight', 'XX', 'CH', dl, ARGV[i])
end
return n
"""
)

# ARGV: prefix, worker_id, ttl_ms. Heartbeat: records this worker alive, forgets long-dead ones.
_HEARTBEAT = (
    _LUA_PRELUDE
    + """
local now = now_ms()
redis.call('ZADD', P .. 'workers', now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', P .. 'workers', '-inf', now - 10 * tonumber(ARGV[3]))
return now
"""
)

# ARGV: prefix, ttl_ms. Ids of the workers heard from within the TTL.
_LIVE_WORKERS = (
    _LUA_PRELUDE
    + """
return redis.call('ZRANGEBYSCORE', P .. 'workers', now_ms() - tonumber(ARGV[2]), '+inf')
"""
)

_SCRIPTS = {
    "enqueue": _ENQUEUE,
    "claim": _CLAIM,
    "complete": _COMPLETE,
    "nack": _NACK,
    "extend": _EXTEND,
    "heartbeat": _HEARTBEAT,
    "live_workers": _LIVE_WORKERS,
}


# -- Reply envelopes -------------------------------------------------------------------------------------------
# `<rid>\nok <batch_size> <tokens> <queue_ms> <compute_ms>\n<ScoreResponse bytes>` or
# `<rid>\nerr\n<CODE>\t<param>\t<message>`. The stats ride in the header so a front-end can record metrics
# and forward the response bytes untouched, without parsing them.


@dataclass(frozen=True)
class ReplyStats:
    batch_size: int
    tokens: int
    queue_ms: float
    compute_ms: float


def encode_ok(rid: str, response_bytes: bytes, stats: ReplyStats) -> bytes:
    head = f"{rid}\nok {stats.batch_size} {stats.tokens} {stats.queue_ms:.3f} {stats.compute_ms:.3f}\n"
    return head.encode() + response_bytes


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
    """Queue parameters shared by front-ends and workers (from TeacherSettings)."""

    prefix: str
    max_pending_per_job: int = 4096
    visibility_ms: int = 30_000
    max_tries: int = 3
    reply_ttl_ms: int = 300_000
    worker_ttl_ms: int = 5_000

    @classmethod
    def from_settings(cls, s) -> QueueConfig:
        return cls(
            prefix=s.key_prefix(),
            max_pending_per_job=s.max_pending_per_job,
            visibility_ms=int(s.visibility_timeout_s * 1000),
            max_tries=s.max_tries,
            reply_ttl_ms=int(s.result_ttl_s * 1000),
            worker_ttl_ms=int(s.worker_ttl_s * 1000),
        )

    def key(self, name: str) -> str:
        return self.prefix + name


class WorkerQueue:
    """The worker's side (synchronous redis-py): claim, complete, nack, extend, heartbeat."""

    def __init__(self, url: str, cfg: QueueConfig) -> None:
        self.cfg = cfg
        self.redis = redis.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=10
        )
        self._s = {name: self.redis.register_script(src) for name, src in _SCRIPTS.items()}

    def claim(self, budget_tokens: int, max_n: int) -> list[Claimed]:
        c = self.cfg
        flat = self._s["claim"](
            args=[c.prefix, budget_tokens, max_n, c.visibility_ms, c.max_tries, c.reply_ttl_ms]
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
        return bool(
            self._s["complete"](args=[self.cfg.prefix, item.rid, item.reply, envelope, self.cfg.reply_ttl_ms])
        )

    def complete_many(self, items: list[tuple[Claimed, bytes]]) -> None:
        """Answers several requests in one round trip (a pipeline of `complete` scripts)."""
        pipe = self.redis.pipeline(transaction=False)
        for item, envelope in items:
            self._s["complete"](
                args=[self.cfg.prefix, item.rid, item.reply, envelope, self.cfg.reply_ttl_ms], client=pipe
            )
        pipe.execute()

    def nack(self, item: Claimed, reason: str, *, count_attempt: bool = True) -> int:
        """Hands a request back (requeued, or failed for good after max_tries). Returns 1 requeued, 2 failed."""
        c = self.cfg
        return int(
            self._s["nack"](
                args=[c.prefix, item.rid, reason, c.max_tries, c.reply_ttl_ms, int(count_attempt)]
            )
        )

    def extend(self, rids: list[str], client: redis.Redis | None = None) -> int:
        if not rids:
            return 0
        return int(self._s["extend"](args=[self.cfg.prefix, self.cfg.visibility_ms, *rids], client=client))

    def heartbeat(self, worker_id: str) -> None:
        self._s["heartbeat"](args=[self.cfg.prefix, worker_id, self.cfg.worker_ttl_ms])

    def live_workers(self) -> list[str]:
        """Ids (host:pid) of the workers heard from within the worker TTL."""
        ids = self._s["live_workers"](args=[self.cfg.prefix, self.cfg.worker_ttl_ms])
        return [w.decode() for w in ids]

    def leave(self, worker_id: str) -> None:
        self.redis.zrem(self.cfg.key("workers"), worker_id)

    def wait_for_work(self, timeout_s: float) -> bool:
        """Blocks on the doorbell up to `timeout_s`; True if it rang."""
        return self.redis.blpop([self.cfg.key("bell")], timeout=timeout_s) is not None

    def close(self) -> None:
        self.redis.close()


class FrontendQueue:
    """The front-end's side (redis.asyncio): enqueue, read replies, health and depth queries."""

    def __init__(self, url: str, cfg: QueueConfig) -> None:
        self.cfg = cfg
        # A bounded pool: thousands of concurrent submits share a few connections instead of opening one each
        # (every connection costs Redis memory and a file descriptor).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=16,
            timeout=5,
            socket_timeout=5,
            socket_connect_timeout=2,
            health_check_interval=10,
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        # A separate connection for the blocking reply read, so it never delays enqueues.
        self.blocking = aioredis.Redis.from_url(url, socket_connect_timeout=2, health_check_interval=10)
        self._s = {name: self.redis.register_script(src) for name, src in _SCRIPTS.items()}

    async def enqueue(
        self, rid: str, payload: bytes, job: str, tokens: int, reply: str, deadline_ms: int
    ) -> bool:
        """Queues a request; False when the job already has max_pending_per_job queued."""
        c = self.cfg
        ttl = max(1, deadline_ms - int(time.time() * 1000)) + c.reply_ttl_ms
        ok = await self._s["enqueue"](
            args=[c.prefix, rid, payload, job, tokens, reply, deadline_ms, c.max_pending_per_job, ttl]
        )
        return bool(ok)

    async def read_replies(self, reply: str, timeout_s: float, max_items: int = 256) -> list[bytes]:
        """Waits up to `timeout_s` for reply envelopes and returns all that are ready (at most `max_items`)."""
        first = await self.blocking.blpop([reply], timeout=timeout_s)
        if first is None:
            return []
        rest = await self.blocking.lpop(reply, max_items - 1) or []
        return [first[1], *rest]

    async def touch(self, reply: str) -> None:
        await self.redis.pexpire(reply, self.cfg.reply_ttl_ms)

    async def live_workers(self) -> int:
        return len(await self._s["live_workers"](args=[self.cfg.prefix, self.cfg.worker_ttl_ms]))

    async def depths(self) -> dict[str, int]:
        """Queued (unclaimed) requests per job."""
        jobs = [j.decode() for j in await self.redis.zrange(self.cfg.key("jobs"), 0, -1)]
        if not jobs:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for j in jobs:
            pipe.llen(self.cfg.key("q:" + j))
        return dict(zip(jobs, await pipe.execute(), strict=True))

    async def inflight(self) -> int:
        return int(await self.redis.zcard(self.cfg.key("inflight")))

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()
        await self.blocking.aclose()
