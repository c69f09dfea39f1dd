"""Prometheus metrics of a teacher front-end (served at GET /metrics).

Per-job labels go only to a caller whose scope covers the job (`exposition`): a tenant sees its own jobs and
the rest summed under job="_other"; a token scoped to every job (no prefix: an operator's) sees them all.

Worker-side figures (batch size, compute time, tokens) arrive in each reply's header, so one front-end's
/metrics describes the whole pipeline it uses without scraping the workers.
"""

from __future__ import annotations

import collections
import time

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.samples import Sample

REQUESTS = Counter(
    "teacher_requests_total", "Requests answered, by transport and status code.", ["transport", "code"]
)
LATENCY = Histogram(
    "teacher_request_latency_seconds",
    "End-to-end latency seen by the front-end.",
    ["transport"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
QUEUE_WAIT = Histogram(
    "teacher_queue_wait_seconds",
    "Time a request waited in Redis before its batch started.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
COMPUTE = Histogram(
    "teacher_batch_compute_seconds",
    "Forward pass + post-processing time of the batch of each request.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram(
    "teacher_batch_size",
    "Requests in the batch that scored each request.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
TOKENS = Counter("teacher_tokens_scored_total", "Prompt + completion tokens of answered requests.")
TOKENS_PER_S = Gauge("teacher_tokens_per_second", "Tokens scored per second over the last 10 s.")
QUEUE_DEPTH = Gauge(
    "teacher_queue_depth",
    "Queued (unclaimed) requests per job; past max_metric_jobs jobs the shallowest are summed as job=_other.",
    ["job"],
)
OTHER_JOBS = "_other"
INFLIGHT = Gauge("teacher_inflight_requests", "Requests claimed by workers and not yet answered.")
PENDING = Gauge("teacher_frontend_pending", "Requests this front-end is waiting on.")
WORKERS = Gauge("teacher_live_workers", "Workers heard from within their TTL.")
REDIS_UP = Gauge("teacher_redis_up", "1 when Redis answered the last health probe.")
BODIES_SCREENED = Counter(
    "teacher_http_bodies_screened_total",
    "HTTP bodies over 64 KiB checked in the body screen's child process (off the event loop), by outcome.",
    ["outcome"],
)


class TokenRate:
    """Tokens per second over a sliding window (for the gauge; Prometheus users can also rate() the counter)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.events: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, tokens: int) -> None:
        self.events.append((time.monotonic(), tokens))

    def rate(self) -> float:
        now = time.monotonic()
        while self.events and self.events[0][0] < now - self.window_s:
            self.events.popleft()
        return sum(t for _, t in self.events) / self.window_s


def bounded_depths(depths: dict[str, int], max_jobs: int) -> dict[str, int]:
    """At most `max_jobs` labels: the deepest jobs (ties by name) and, when more exist, `_other` holding the
    sum of the rest, so a flood of job ids cannot grow the metrics without bound."""
    if len(depths) <= max_jobs:
        return dict(depths)
    ranked = sorted(depths.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = dict(ranked[: max_jobs - 1])
    shown[OTHER_JOBS] = sum(n for _, n in ranked[max_jobs - 1 :])
    return shown


def set_depths(depths: dict[str, int], known: set[str], max_jobs: int) -> set[str]:
    """Updates the per-job depth gauge (bounded, see `bounded_depths`); jobs that drained disappear. Returns
    the labels shown."""
    shown = bounded_depths(depths, max_jobs)
    for job in known - set(shown):
        QUEUE_DEPTH.remove(job)
    for job, n in shown.items():
        QUEUE_DEPTH.labels(job=job).set(n)
    return set(shown)


class _Scoped:
    """The default registry with every `job` label outside `prefix` summed into job="_other" (a collector view
    for `generate_latest`)."""

    def __init__(self, prefix: str | None) -> None:
        self.prefix = prefix

    def collect(self):
        for family in REGISTRY.collect():
            if not any("job" in s.labels for s in family.samples):
                yield family
                continue
            kept, hidden = [], {}
            for s in family.samples:
                job = s.labels.get("job")
                if job is None or (
                    self.prefix is not None and job != OTHER_JOBS and job.startswith(self.prefix)
                ):
                    kept.append(s)
                else:
                    hidden[s.name] = hidden.get(s.name, 0.0) + s.value
            kept += [Sample(name, {"job": OTHER_JOBS}, value) for name, value in hidden.items()]
            family.samples = kept
            yield family


def exposition(job_prefix: str | None) -> bytes:
    """The Prometheus text for a caller whose jobs start with `job_prefix` ("" for every job; None for a caller
    with no scope, e.g. an unauthenticated scrape with metrics_need_token off, which sees no job label)."""
    if job_prefix == "":
        return generate_latest()
    return generate_latest(_Scoped(job_prefix))
