"""Real teacher processes for service tests: a front-end (`serve` or `frontend`) plus separate workers.

A thin layer over `services.teacher.launch` (shared with the demo and the benchmarks) with test defaults:
short leases and worker TTLs, so fault tests do not wait long for a dead worker's batch.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import grpc
import redis

from services.teacher.launch import ChildProcess, TeacherProcess, child_env
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.types import ScoreRequest, ScoreResult
from services.util.net import free_port

env = child_env
Proc = ChildProcess
TEST_FLAGS = {"visibility-timeout-s": "3", "worker-ttl-s": "2"}


class Teacher:
    """A teacher front-end on free ports, plus any separate worker processes (`add_worker`)."""

    def __init__(
        self,
        model: Path,
        redis_url: str,
        tmp: Path,
        *,
        mode: str = "serve",
        workers: int = 1,
        flags: dict | None = None,
    ) -> None:
        self.tmp, self.redis_url = tmp, redis_url
        flags = {**TEST_FLAGS, **(flags or {})}
        self.front = TeacherProcess(
            model, redis_url, tmp / f"{mode}-{free_port()}.log", mode=mode, workers=workers, flags=flags
        )
        self.workers: list[ChildProcess] = []

    # the front-end may move to new ports when one it was given is taken before it binds (launch.py)
    @property
    def grpc_port(self) -> int:
        return self.front.grpc_port

    @property
    def http_port(self) -> int:
        return self.front.http_port

    @property
    def target(self) -> str:
        return self.front.target

    @property
    def http(self) -> str:
        return self.front.http

    def add_worker(self) -> ChildProcess:
        w = ChildProcess(
            self.front.worker_args({"torch-threads": "1"}),
            self.tmp / f"worker-{len(self.workers)}-{self.grpc_port}.log",
        )
        self.workers.append(w)
        return w

    def wait_healthy(self, timeout: float = 90.0) -> None:
        self.front.wait_healthy(timeout)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.front.stop()

    def __enter__(self) -> Teacher:
        """Waits until healthy; stopped on leaving, also when it never got healthy."""
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)


def unary_score(ch: grpc.Channel) -> Callable[..., pb.ScoreResponse]:
    """The raw unary Score method on `ch` (no client-side validation or retries in between)."""
    return ch.unary_unary(
        "/teacher.v1.Teacher/Score",
        request_serializer=pb.ScoreRequest.SerializeToString,
        response_deserializer=pb.ScoreResponse.FromString,
    )


def assert_invalid_argument(err: grpc.RpcError, param: str) -> None:
    """A refused request: INVALID_ARGUMENT naming `param` in the details and in the x-error-param trailer."""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"`{param}`" in err.details()
    assert dict(err.trailing_metadata())["x-error-param"] == param


async def raw_stream(
    port: int, reqs: list[ScoreRequest], on_answer: Callable[[str], None] | None = None
) -> tuple[collections.Counter, dict[str, ScoreResult]]:
    """Sends every request on one raw ScoreStream (no client retries or de-duplication in between) and
    returns how many answers each request_id got, and the answers. Fails on any in-band error."""
    counts, got = collections.Counter(), {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream(
            "/teacher.v1.Teacher/ScoreStream",
            request_serializer=pb.ScoreRequest.SerializeToString,
            response_deserializer=pb.ScoreResponse.FromString,
        )(iter([r.to_pb() for r in reqs]))
        async for resp in call:
            assert not resp.HasField("error"), resp.error
            counts[resp.request_id] += 1
            got[resp.request_id] = ScoreResult.from_pb(resp)
            if on_answer is not None:
                on_answer(resp.request_id)
    return counts, got
