"""The async client against a real teacher: it survives a front-end restart mid-call by retrying UNAVAILABLE
(idempotent by request id), honours deadlines, and a SIGTERM'd teacher shuts down cleanly."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import numpy as np
import pytest
from teacher_proc import Proc, Teacher

from services.teacher.client import TeacherClient
from services.teacher.engine import load_engine
from services.teacher.errors import DeadlineExceeded, Unavailable
from services.teacher.settings import TeacherSettings
from services.teacher.types import ScoreRequest


def reqs(n: int, seed: int = 0) -> list[ScoreRequest]:
    rng = np.random.default_rng(seed)
    return [
        ScoreRequest(rng.integers(0, 512, 20), rng.integers(0, 512, 10), request_id=f"r{i}", job_id="client")
        for i in range(n)
    ]


def test_survives_frontend_restart(tiny_teacher, redis_url, tmp_path):
    t = Teacher(tiny_teacher, redis_url, tmp_path, mode="frontend")
    t.add_worker()
    try:
        t.wait_healthy()
        work = reqs(400)

        async def go():
            async with TeacherClient(t.target, max_in_flight=8, retries=20) as c:
                task = asyncio.create_task(c.score_many(work))
                await asyncio.sleep(0.5)
                t.front.signal(signal.SIGKILL)  # the front-end dies mid-stream
                t.front.p.wait()
                await asyncio.sleep(0.5)
                t.front = Proc(t.front.args, tmp_path / "frontend-2.log")  # same ports
                return await task

        results = asyncio.run(go())
        assert [r.request_id for r in results] == [q.request_id for q in work]
        expected = load_engine(str(tiny_teacher)).score(work)
        for got, exp in zip(results, expected, strict=True):
            np.testing.assert_allclose(got.token_logprobs, exp.token_logprobs, atol=1e-5)
    finally:
        t.stop()


def test_unreachable_teacher_raises_unavailable_after_retries():
    async def go():
        async with TeacherClient("127.0.0.1:1", retries=2, timeout_s=2) as c:
            await c.score_many(reqs(2))

    t0 = time.perf_counter()
    with pytest.raises(Unavailable):
        asyncio.run(go())
    assert time.perf_counter() - t0 < 15


def test_deadline_without_worker(tiny_teacher, redis_url, tmp_path):
    """A front-end whose worker vanished after accepting answers DEADLINE_EXCEEDED at the request's deadline."""
    t = Teacher(tiny_teacher, redis_url, tmp_path, mode="frontend", flags={"worker-ttl-s": "30"})
    w = t.add_worker()
    try:
        t.wait_healthy()
        w.signal(signal.SIGKILL)  # still counted alive for 30 s, so requests are accepted and wait
        w.p.wait()
        q = reqs(1)[0]
        q.timeout_ms = 1500

        async def go():
            async with TeacherClient(t.target, retries=0) as c:
                return await c.score(q)

        t0 = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            asyncio.run(go())
        assert 1.4 < time.perf_counter() - t0 < 5
    finally:
        t.stop()


def test_sigterm_shuts_serve_down_cleanly(tiny_teacher, redis_url, tmp_path):
    t = Teacher(tiny_teacher, redis_url, tmp_path, workers=2)
    t.wait_healthy()
    children = subprocess.check_output(["pgrep", "-P", str(t.front.pid)]).split()
    assert len(children) >= 2
    t.front.p.send_signal(signal.SIGTERM)  # the front-end only: it must stop its workers itself
    assert t.front.p.wait(30) == 0

    def alive():
        return [
            c
            for c in children
            if subprocess.run(["kill", "-0", c.decode()], capture_output=True).returncode == 0
        ]

    end = time.monotonic() + 5  # multiprocessing's resource tracker exits a moment after its parent
    while alive() and time.monotonic() < end:
        time.sleep(0.1)
    assert alive() == []
    assert "teacher front-end stopped" in t.front.text()
    workers_key = TeacherSettings(model=str(tiny_teacher)).key_namespace() + "workers"
    # our workers left the registry on their way out (earlier tests in this module may have left dead ones)
    ours = {c.decode() for c in children}
    left = [w.decode() for w in t.redis().zrange(workers_key, 0, -1) if w.decode().rsplit(":", 1)[1] in ours]
    assert left == [], f"{left}\n{t.front.text()}"
    t.front.stop()  # already exited: closes its log


def test_a_broken_stream_is_retried_a_server_internal_is_not():
    """grpcio's own INTERNAL for a write into an ending stream (grpc#36066) means the stream broke: retried,
    like CANCELLED; an INTERNAL the server sent, and the server's trailers, are kept."""
    import grpc

    from services.teacher.client import _rpc_error
    from services.teacher.errors import retryable

    def err(code, details, trailers=()):
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)

    core = _rpc_error(err(grpc.StatusCode.INTERNAL, "Internal error from Core"))
    server = _rpc_error(err(grpc.StatusCode.INTERNAL, "internal error: KeyError"))
    cancelled = _rpc_error(err(grpc.StatusCode.CANCELLED, "Cancelled"))
    full = _rpc_error(
        err(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "full",
            (("x-error-param", "job_id"), ("retry-after-ms", "250")),
        )
    )
    assert (core.code, server.code, cancelled.code) == ("UNAVAILABLE", "INTERNAL", "UNAVAILABLE")
    assert [retryable(e) for e in (core, server, cancelled, full)] == [True, False, True, True]
    assert (full.param, full.retry_after_s) == ("job_id", 0.25)


class FakeClock:
    """A clock that moves only when the code under test sleeps (the retry budget's arithmetic, no waiting)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def spend(budget, clock: FakeClock, call_s: float = 0.0, err=None) -> list[float]:
    """Every delay `budget` grants, the clock advancing by each delay plus a failed call's `call_s`."""
    delays = []
    while (d := budget.next_delay(err)) is not None:
        delays.append(d)
        clock.t += d + call_s
        assert len(delays) < 10_000
    return delays


@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.999999])
def test_the_retry_budget_is_a_time_from_the_first_failure(jitter):
    """A budget of 120 s: back-off 0.2 s doubling to 2 s (+-50% jitter), the last retry sent when the budget
    ends; whatever the jitter, the retries span exactly the budget, and no gap between two exceeds 3 s (the cap
    plus its jitter), so a request is sent again at most 3 s after an outage of any length up to the budget
    ends. 20 retries (the old count) spanned 35 s on average and 52.5 s at most: less than a 60 s outage."""
    from services.teacher.client import BACKOFF_CAP_S, ClientOptions, RetryBudget, retry_delay

    clock = FakeClock()
    budget = RetryBudget(120.0, 1000, clock=clock, rand=lambda: jitter)
    delays = spend(budget, clock)
    assert sum(delays) == pytest.approx(120.0)
    assert max(delays) <= BACKOFF_CAP_S * 1.5
    scale = 0.5 + jitter
    assert delays[:4] == pytest.approx([0.2 * scale, 0.4 * scale, 0.8 * scale, 1.6 * scale])
    assert budget.next_delay(None) is None  # spent stays spent
    old = sum(retry_delay(a, None, lambda: 0.999999) for a in range(1, 21))
    assert old < 60.0 <= ClientOptions().retry_budget_s / 2  # the default covers a 60 s outage twice over
    # time spent in the failed calls themselves counts against the budget too
    clock = FakeClock()
    slow_calls = spend(RetryBudget(120.0, 1000, clock=clock, rand=lambda: jitter), clock, call_s=5.0)
    assert 115.0 <= sum(slow_calls) + 5.0 * (len(slow_calls) - 1) <= 120.0 + 1e-9


def test_the_retry_budget_count_zero_hints_and_reset():
    """The count still bounds the retries (`retries=3`: three); a budget of 0 s, or `retries=0`, never retries;
    a server's retry-after hint is the delay (within the budget left); `reset` (a stream answered) starts a new
    budget."""
    from services.teacher.client import RetryBudget
    from services.teacher.errors import QueueFull

    clock = FakeClock()
    assert len(spend(RetryBudget(120.0, 3, clock=clock), clock)) == 3
    assert RetryBudget(0.0, 1000, clock=clock).next_delay(None) is None
    assert RetryBudget(120.0, 0, clock=clock).next_delay(None) is None
    full = QueueFull("busy", "job_id", retry_after_s=7.0)
    hinted = spend(RetryBudget(20.0, 1000, clock=clock, rand=lambda: 0.5), clock, err=full)
    assert hinted == pytest.approx([7.7, 7.7, 4.6])  # 7 s + 10% jitter, the last one cut to the budget's end
    budget = RetryBudget(10.0, 1000, clock=clock)
    spend(budget, clock)
    budget.reset()
    assert budget.next_delay(None) is not None


def test_an_unreachable_teacher_is_retried_for_the_budget_then_unavailable():
    """The budget is real time on the wire: a stream to a closed port is reopened for retry_budget_s (3 s here,
    count unbounded), then UNAVAILABLE; a unary call likewise."""

    async def go(many: bool):
        async with TeacherClient("127.0.0.1:1", retry_budget_s=3.0, timeout_s=2) as c:
            if many:
                await c.score_many(reqs(2))
            else:
                await c.score(reqs(1)[0])
            return c.stats

    for many in (True, False):
        t0 = time.perf_counter()
        with pytest.raises(Unavailable):
            asyncio.run(go(many))
        assert 3.0 <= time.perf_counter() - t0 < 8.0
