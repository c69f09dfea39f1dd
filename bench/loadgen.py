"""Steady load of several student jobs against one teacher, for the fault suite and the soak.

Each job runs `streams` coroutines on an event loop in a background thread; each sends chunks of `chunk`
requests with `TeacherClient.score_many` (the trainer's path: ScoreStream with the client's retries) or, with
`chunk=0`, one request at a time with `score` (unary, so every request has its own latency); `pace_s` is a
pause after each chunk (a steady load rather than a saturating one). Requests are
deterministic per (job, index), so every answer can be checked afterwards against a direct forward pass.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from services.teacher.client import TeacherClient
from services.teacher.types import ScoreRequest, ScoreResult

VOCAB = 512


def make_request(job: str, i: int, top_k: int = 2) -> ScoreRequest:
    """The i-th request of `job`: a short random prompt and completion (same every time)."""
    rng = np.random.default_rng([zlib.crc32(job.encode()), i])
    return ScoreRequest(
        rng.integers(0, VOCAB, int(rng.integers(4, 24))),
        rng.integers(0, VOCAB, int(rng.integers(2, 12))),
        request_id=f"{job}:{i}",
        job_id=job,
        top_k=top_k,
    )


@dataclass
class JobTally:
    """What one job sent and got."""

    job: str
    sent: int = 0
    answered: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    answers: dict[int, ScoreResult] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    """monotonic time of each answer (per request for unary, per chunk for streams)."""
    latencies: list[float] = field(default_factory=list)
    """seconds per request (unary) or per chunk (streams)."""


class Load:
    """`start()` the jobs, `stop()` them (letting the chunks in hand finish), then read `tallies` and `stats`."""

    def __init__(
        self,
        target: str,
        jobs: int,
        *,
        chunk: int = 8,
        streams: int = 2,
        prefix: str = "load",
        keep_answers: bool = True,
        pace_s: float = 0.0,
        **client_options,
    ) -> None:
        self.target, self.chunk, self.streams, self.keep = target, chunk, streams, keep_answers
        self.pace_s = pace_s
        self.options = {"retries": 40, "timeout_s": 60.0, **client_options}
        self.tallies = [JobTally(f"{prefix}-{j}") for j in range(jobs)]
        self.clients: list[TeacherClient] = []
        self._next = [0] * jobs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="load", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 180.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            assert not self._thread.is_alive(), "the load did not finish its requests in time"

    def answered(self) -> int:
        return sum(t.answered for t in self.tallies)

    async def _main(self) -> None:
        self.clients = [TeacherClient(self.target, **self.options) for _ in self.tallies]
        try:
            await asyncio.gather(
                *(self._loop(j) for j in range(len(self.tallies)) for _ in range(self.streams))
            )
        finally:
            for c in self.clients:
                await c.close()

    def _take(self, j: int, n: int) -> list[int]:
        start = self._next[j]
        self._next[j] += n
        return list(range(start, start + n))

    async def _loop(self, j: int) -> None:
        tally, client = self.tallies[j], self.clients[j]
        while not self._stop.is_set():
            ids = self._take(j, max(1, self.chunk))
            reqs = [make_request(tally.job, i) for i in ids]
            tally.sent += len(reqs)
            t0 = time.monotonic()
            if self.chunk:
                results = await client.score_many(reqs, return_exceptions=True)
            else:
                results = [await self._one(client, reqs[0])]
            now = time.monotonic()
            for i, res in zip(ids, results, strict=True):
                if isinstance(res, ScoreResult):
                    tally.answered += 1
                    if self.keep:
                        tally.answers[i] = res
                else:
                    tally.errors[getattr(res, "code", type(res).__name__)] += 1
            tally.times.append(now)
            tally.latencies.append(now - t0)
            if self.pace_s:
                await asyncio.sleep(self.pace_s)

    @staticmethod
    async def _one(client: TeacherClient, req: ScoreRequest):
        try:
            return await client.score(req)
        except Exception as err:  # noqa: BLE001 - tallied by code
            return err

    def stats(self) -> dict[str, int]:
        """The clients' wire counters, summed over jobs."""
        out: collections.Counter = collections.Counter()
        for c in self.clients:
            for k, v in vars(c.stats).items():
                out[k] += v
        return dict(out)

    def wrong_answers(self, engine, atol: float = 1e-4) -> int:
        """Answers that differ from `engine` (a direct forward pass) on the same request."""
        wrong = 0
        for tally in self.tallies:
            ids = sorted(tally.answers)
            for k in range(0, len(ids), 64):
                part = ids[k : k + 64]
                expected = engine.score([make_request(tally.job, i) for i in part])
                for i, exp in zip(part, expected, strict=True):
                    got = tally.answers[i]
                    if not (
                        np.allclose(got.token_logprobs, exp.token_logprobs, atol=atol)
                        and np.array_equal(got.top_k_ids, exp.top_k_ids)
                    ):
                        wrong += 1
        return wrong

    def recovery_s(self, fault_at: float, window_s: float = 60.0) -> float:
        """The longest any job went without an answer after `fault_at` (within `window_s`): from the fault, or
        from its last answer after it, to its next answer. Inf if a job never got one again."""
        worst = 0.0
        for tally in self.tallies:
            times = [t for t in sorted(tally.times) if t <= fault_at + window_s]
            after = [t for t in times if t > fault_at]
            if not after:
                return float("inf")
            marks = [fault_at, *after]
            worst = max(worst, max(b - a for a, b in zip(marks, marks[1:], strict=False)))
        return worst
