"""The worker's grouping of a batch into groups answered one after another (`reply_groups`), and its gathering of
a burst of requests before it claims a batch (`Worker._gather`)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from services.teacher.queue import FrontendQueue
from services.teacher.redis_server import RedisProcess
from services.teacher.settings import TeacherSettings
from services.teacher.types import ScoreRequest
from services.teacher.worker import Worker, reply_groups


def req(t: int, full: bool = False, dtype: str = "float32") -> ScoreRequest:
    return ScoreRequest(np.array([1, 2]), np.arange(t), full=full, full_dtype=dtype)


def test_light_requests_first_then_full_rows_in_bounded_groups():
    # vocab 1000: a 100-position float32 request is 400 kB of rows; groups hold at most 1 MB.
    reqs = [req(100, True), req(5), req(100, True), req(100, True), req(7), req(100, True, "float16")]
    assert reply_groups(reqs, 1000, max_bytes=1_000_000) == [[1, 4], [0, 2], [3, 5]]


def test_a_request_larger_than_the_bound_is_a_group_of_its_own():
    reqs = [req(1000, True), req(1000, True), req(3)]
    assert reply_groups(reqs, 1000, max_bytes=10) == [[2], [0], [1]]


def test_a_batch_without_full_rows_is_one_group():
    assert reply_groups([req(3), req(4)], 1000) == [[0, 1]]
    assert reply_groups([], 1000) == []


# -- gathering a burst before claiming (Worker._gather), against a real Redis -----------------------------------
@pytest.fixture()
def redis_server(tmp_path):
    with RedisProcess(workdir=str(tmp_path)) as s:
        yield s


def enqueue_spread(url: str, cfg, n: int, gap_s: float, start: int = 0) -> None:
    """Enqueues `n` requests of job `j`, `gap_s` apart, as a trainer's burst arrives through a front-end."""

    async def go():
        q = FrontendQueue(url, cfg)
        deadline = int(time.time() * 1000) + 60_000
        for i in range(start, start + n):
            await q.enqueue(f"r{i}", b"payload", "j", 10, "pd:gather:reply:fe", deadline)
            await asyncio.sleep(gap_s)
        await q.close()

    asyncio.run(go())


def gathering_worker(url: str, **kw) -> Worker:
    return Worker(None, TeacherSettings(model="m", redis_url=url, namespace="gather", **kw))


def test_gather_waits_while_a_burst_keeps_arriving(redis_server):
    w = gathering_worker(redis_server.url, batch_wait_ms=50, batch_wait_max_ms=5000)
    enqueue_spread(redis_server.url, w.qcfg, 1, 0.0)
    rest = threading.Thread(target=enqueue_spread, args=(redis_server.url, w.qcfg, 19, 0.005, 1))
    rest.start()
    w._gather()
    rest.join()
    assert w.queue.queued() == 20  # the whole burst waited for, not the first request alone
    assert len(w.queue.claim(10_000, 64)) == 20 and w.queue.queued() == 0


def test_gather_is_bounded_and_skips_a_stale_ring(redis_server):
    w = gathering_worker(redis_server.url, batch_wait_ms=10, batch_wait_max_ms=100)
    t0 = time.monotonic()
    w._gather()  # nothing queued (a ring whose request was claimed already): no wait at all
    assert time.monotonic() - t0 < 0.01
    trickle = threading.Thread(target=enqueue_spread, args=(redis_server.url, w.qcfg, 100, 0.005))
    trickle.start()
    while not w.queue.queued():
        time.sleep(0.001)
    t0 = time.monotonic()
    w._gather()  # a trickle that never stops: claimed after batch_wait_max_ms
    waited = time.monotonic() - t0
    trickle.join()
    assert 0.09 < waited < 0.5
