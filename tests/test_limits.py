"""Limits of the real service and the client's one retry policy: a job whose queue fills in the middle of a
stream (every request answered once, exactly), an in-band error that settles only its own request, deadlines
carried into the queue (an expired or abandoned request never reaches a forward pass: counted on the worker's
side), the bound on job labels in /metrics, and ids with a bounded length and a safe character set."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import grpc
import httpx
import numpy as np
import pytest
from teacher_proc import Teacher

from services.teacher.client import TeacherClient
from services.teacher.engine import load_engine
from services.teacher.errors import DeadlineExceeded, InvalidRequest
from services.teacher.metrics import OTHER_JOBS, bounded_depths
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.queue import QueueConfig, WorkerQueue
from services.teacher.settings import TeacherSettings
from services.teacher.types import MAX_ID_CHARS, ScoreRequest

FLAGS = {"max-pending-per-job": "4", "retry-after-s": "0.05", "worker-ttl-s": "30", "max-metric-jobs": "3"}


@pytest.fixture(scope="module")
def teacher(tiny_teacher, redis_url, tmp_path_factory):
    """A front-end with one separate worker; a dead worker still counts as alive for 30 s (worker-ttl-s)."""
    t = Teacher(tiny_teacher, redis_url, tmp_path_factory.mktemp("limits"), mode="frontend", flags=FLAGS)
    t.add_worker()
    with t:
        yield t


def reqs(n: int, job: str, seed: int = 0, **kw) -> list[ScoreRequest]:
    rng = np.random.default_rng(seed)
    return [
        ScoreRequest(
            rng.integers(0, 512, 12), rng.integers(0, 512, 8), request_id=f"{job}-{i}", job_id=job, **kw
        )
        for i in range(n)
    ]


def queue_stats(t: Teacher, model) -> dict[str, int]:
    q = WorkerQueue(t.redis_url, QueueConfig.from_settings(TeacherSettings(model=str(model))))
    try:
        return q.stats()
    finally:
        q.close()


def test_a_queue_that_fills_mid_stream_loses_nothing_and_answers_once(teacher, tiny_teacher):
    """max_pending_per_job=4 and 64 in flight: most first tries come back RESOURCE_EXHAUSTED with a 50 ms hint,
    and the client sends each again until it is answered; one request with a bad top_k fails alone."""
    work = reqs(100, "fill", seed=1)
    work[37] = ScoreRequest([1, 2], [3], request_id="bad", job_id="fill", top_k=10_000)

    async def go():
        async with TeacherClient(teacher.target, max_in_flight=64, retries=100) as c:
            return await c.score_many(work, return_exceptions=True), c.stats

    results, stats = asyncio.run(go())
    assert isinstance(results[37], InvalidRequest) and results[37].param == "top_k"
    good = [i for i in range(100) if i != 37]
    expected = load_engine(str(tiny_teacher)).score([work[i] for i in good])
    for i, exp in zip(good, expected, strict=True):
        assert results[i].request_id == work[i].request_id
        np.testing.assert_allclose(results[i].token_logprobs, exp.token_logprobs, atol=1e-5)
    print(
        f"sent {stats.sent}, retried {stats.retried}, answered {stats.answered}, duplicates {stats.duplicates}"
    )
    assert stats.retried > 10 and stats.answered == 99 and stats.duplicates == 0

    async def raising():
        async with TeacherClient(teacher.target) as c:
            return await c.score_many(work[36:38])

    with pytest.raises(InvalidRequest):  # without return_exceptions the error is raised, after the others
        asyncio.run(raising())


def test_expired_and_abandoned_requests_never_reach_a_forward_pass(teacher, tiny_teacher):
    """With the only worker dead (but still counted alive), 6 requests with a 300 ms deadline time out and 5
    more are abandoned by a cancelled stream. A new worker then drops the first 6 at claim time and finds the 5
    withdrawn: the worker-side `scored` counter moves only for the 2 requests sent afterwards."""
    teacher.workers[0].signal(signal.SIGKILL)
    teacher.workers[0].p.wait()
    r = teacher.redis()
    ns = TeacherSettings(model=str(tiny_teacher)).key_namespace()
    before = queue_stats(teacher, tiny_teacher)
    late = [q for i in range(6) for q in reqs(1, f"late-{i}", seed=i, timeout_ms=300)]

    async def expire():
        async with TeacherClient(teacher.target, retries=0) as c:
            return await c.score_many(late, return_exceptions=True)

    assert all(isinstance(x, DeadlineExceeded) for x in asyncio.run(expire()))

    async def abandon():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{teacher.grpc_port}") as ch:
            call = ch.stream_stream(
                "/teacher.v1.Teacher/ScoreStream", request_serializer=pb.ScoreRequest.SerializeToString
            )(iter([q.to_pb() for i in range(5) for q in reqs(1, f"gone-{i}", seed=10 + i)]))
            while sum(r.llen(f"{ns}q:gone-{i}") for i in range(5)) < 5:
                await asyncio.sleep(0.01)
            await asyncio.sleep(1.2)  # two health probes: the depth gauge shows the queued jobs
            labels = re.findall(
                r'teacher_queue_depth\{job="([^"]+)"\}', httpx.get(teacher.http + "/metrics").text
            )
            call.cancel()
            return labels

    labels = asyncio.run(abandon())
    assert len(labels) <= 3 and OTHER_JOBS in labels  # 11 jobs queued, 3 labels (max-metric-jobs)
    end = time.monotonic() + 10
    while any(r.llen(f"{ns}q:gone-{i}") for i in range(5)) and time.monotonic() < end:
        time.sleep(0.05)
    teacher.add_worker()
    end = time.monotonic() + 60
    while r.zcard(f"{ns}jobs") and time.monotonic() < end:  # the new worker drains (drops) what is queued
        time.sleep(0.1)

    async def fresh():
        async with TeacherClient(teacher.target) as c:
            return await c.score_many(reqs(2, "after", seed=99))

    assert len(asyncio.run(fresh())) == 2
    after = queue_stats(teacher, tiny_teacher)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("scored", "expired", "withdrawn")}
    print(f"worker-side counters over the test: {delta}")
    assert delta == {"scored": 2, "expired": 6, "withdrawn": 5}


def test_bounded_depths_keep_the_deepest_jobs():
    depths = {f"j{i}": i for i in range(10)}
    assert bounded_depths(depths, 20) == depths
    assert bounded_depths(depths, 3) == {"j9": 9, "j8": 8, OTHER_JOBS: sum(range(8))}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("job_id", "a b", "may only hold"),
        ("job_id", "", "must not be empty"),
        ("job_id", "j" * (MAX_ID_CHARS + 1), f"at most {MAX_ID_CHARS} characters"),
        ("job_id", "tab\there", "may only hold"),
        ("request_id", "x" * 500, f"at most {MAX_ID_CHARS} characters"),
        ("request_id", "ünïcode", "may only hold"),
    ],
)
def test_ids_are_bounded_and_safe(field, value, message):
    with pytest.raises(InvalidRequest, match=message) as ei:
        ScoreRequest([1], [2], **{field: value})
    assert ei.value.param == field


def test_ids_are_checked_on_both_transports(teacher):
    body = {"prompt_token_ids": [1], "completion_token_ids": [2], "job_id": "no spaces"}
    r = httpx.post(teacher.http + "/v1/logprobs", json=body, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "job_id"
    bad = pb.ScoreRequest(request_id="r" * 300, job_id="ok", prompt_token_ids=[1], completion_token_ids=[2])
    with grpc.insecure_channel(f"127.0.0.1:{teacher.grpc_port}") as ch:
        call = ch.unary_unary(
            "/teacher.v1.Teacher/Score", request_serializer=pb.ScoreRequest.SerializeToString
        )
        with pytest.raises(grpc.RpcError) as ei:
            call(bad, timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(ei.value.trailing_metadata())["x-error-param"] == "request_id"
