"""A teacher worker: claims fair batches from the Redis queue, runs the engine, answers, acknowledges.

One loop per process (the engine owns the CPU/GPU). While a batch computes, a lease thread keeps extending
its visibility, so only a dead (or hung) worker's batch is re-claimed. A batch that raises is retried request by
request, so one poisonous request fails alone; requests on their second or later attempt are scored alone too
(a crash that killed the process leaves no exception to catch). SIGTERM/SIGINT: stop claiming, finish the
batch in hand, leave.

Full vocabulary rows are large (~100 KB a position for a 49k vocabulary in float16), so a batch that asks for
them is scored in groups of at most `FULL_ROWS_GROUP_BYTES` of rows, each answered as soon as it is computed:
the front-end, gRPC and the client carry one group's rows while the next one computes, rather than all of them
after the whole batch (bench/teacher_throughput.py, "service full rows").
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time

import redis

from services.teacher.codec import dtype_itemsize
from services.teacher.errors import DeadlineExceeded, TeacherError
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.queue import Claimed, QueueConfig, ReplyStats, WorkerQueue, encode_err, encode_ok
from services.teacher.settings import TeacherSettings
from services.teacher.types import ScoreRequest

log = logging.getLogger("prefix_distill.worker")

# Full rows answered per group (bytes on the wire): about two 256-token requests of a 49k vocabulary in float16.
FULL_ROWS_GROUP_BYTES = 48 * 1024 * 1024


def reply_groups(requests: list[ScoreRequest], vocab_size: int, max_bytes: int = FULL_ROWS_GROUP_BYTES):
    """Indices of `requests` in the groups a batch is scored and answered in: every request without full rows
    in one group first, then the full-row requests in order, in groups of at most `max_bytes` of rows (at
    least one request each)."""
    light = [i for i, r in enumerate(requests) if not r.full]
    heavy: list[list[int]] = []
    size = 0
    for i, r in enumerate(requests):
        if not r.full:
            continue
        nbytes = r.completion_token_ids.size * vocab_size * dtype_itemsize(r.full_dtype)
        if heavy and size + nbytes <= max_bytes:
            heavy[-1].append(i)
            size += nbytes
        else:
            heavy.append([i])
            size = nbytes
    return ([light] if light else []) + heavy


class Worker:
    """Serves one engine from the queue until `stop()`."""

    def __init__(self, engine, settings: TeacherSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.qcfg = QueueConfig.from_settings(settings)
        self.queue = WorkerQueue(settings.redis_url, self.qcfg)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._held: list[str] = []  # rids of the batch in hand (read by the lease thread)
        self._held_lock = threading.Lock()
        self.batches = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def stop(self, *_args) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> None:
        """Main loop: heartbeat, claim, score, answer; survives Redis outages by backing off."""
        lease = threading.Thread(target=self._lease_loop, name="lease", daemon=True)
        lease.start()
        log.info("worker %s serving %s", self.worker_id, self.qcfg.namespace)
        s = self.settings
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self.queue.heartbeat(self.worker_id)
                items = self.queue.claim(s.max_batch_tokens, s.max_batch_size, self.engine.reuses_prompts)
                if not items:
                    if self.queue.wait_for_work(0.25) and s.batch_wait_ms:
                        self._gather()
                    continue
                self._process(items)
                backoff = 0.1
            except redis.RedisError as err:
                log.warning("redis unavailable (%s); retrying in %.1fs", err, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        lease.join(5.0)  # its last heartbeat must not land after we leave the registry
        try:
            self.queue.leave(self.worker_id)
        except redis.RedisError:
            pass
        self.queue.close()
        log.info("worker %s stopped after %d batches", self.worker_id, self.batches)

    def _gather(self) -> None:
        """Lets a burst arrive before claiming (bigger batches): waits `batch_wait_ms`, again while requests
        kept arriving in the last wait, for at most `batch_wait_max_ms` in all or until a full batch waits."""
        s = self.settings
        deadline = time.monotonic() + s.batch_wait_max_ms / 1000.0
        queued = self.queue.queued()
        if not queued:  # a stale ring: what it announced was claimed already
            return
        while True:
            time.sleep(s.batch_wait_ms / 1000.0)
            now = self.queue.queued()
            if now == queued or now >= s.max_batch_size or time.monotonic() >= deadline:
                return
            queued = now

    def _lease_loop(self) -> None:
        """Extends the leases of the batch in hand every third of the visibility timeout; heartbeats too."""
        q = WorkerQueue(self.settings.redis_url, self.qcfg)
        period = max(0.05, min(self.qcfg.visibility_ms, self.qcfg.worker_ttl_ms) / 3000.0)
        while not self._stop.wait(period):
            with self._held_lock:
                rids = list(self._held)
            try:
                q.heartbeat(self.worker_id)
                q.extend(rids)
            except redis.RedisError:
                pass
        q.close()

    # -- work --------------------------------------------------------------------------------------------------
    def _process(self, items: list[Claimed]) -> None:
        with self._held_lock:
            self._held = [it.rid for it in items]
        try:
            now_ms = int(time.time() * 1000)
            replies: list[tuple[Claimed, bytes]] = []
            fresh: list[tuple[Claimed, ScoreRequest]] = []
            retried: list[tuple[Claimed, ScoreRequest]] = []
            for it in items:
                if it.deadline_ms and it.deadline_ms < now_ms:
                    late = DeadlineExceeded("the request's deadline passed in the queue")
                    replies.append((it, encode_err(it.rid, late)))
                    continue
                try:
                    req = ScoreRequest.from_pb(pb.ScoreRequest.FromString(it.payload))
                except TeacherError as err:
                    replies.append((it, encode_err(it.rid, err)))
                    continue
                (retried if it.attempts > 1 else fresh).append((it, req))
            if replies:  # refused before any compute: answered at once
                self.queue.complete_many(replies)
            vocab = self.engine.info.vocab_size
            groups = [[fresh[i] for i in g] for g in reply_groups([r for _, r in fresh], vocab)]
            for group in groups + [[one] for one in retried]:
                self.queue.complete_many(self._score_group(group), scored=len(group))
            self.batches += 1
        finally:
            with self._held_lock:
                self._held = []

    def _score_group(self, group: list[tuple[Claimed, ScoreRequest]]) -> list[tuple[Claimed, bytes]]:
        """Scores a group; on an engine exception, retries each request alone and nacks those that fail."""
        try:
            results = self.engine.score([req for _, req in group])
        except Exception as err:  # noqa: BLE001 - any engine failure must not kill the worker
            if len(group) > 1:
                log.warning("batch of %d failed (%r); retrying one by one", len(group), err)
                out = []
                for one in group:
                    out += self._score_group([one])
                return out
            it, _ = group[0]
            log.warning("request %s failed on attempt %d: %r", it.rid, it.attempts, err)
            if self.queue.nack(it, f"{type(err).__name__}: {err}") == 2:
                log.error("request %s failed for good after %d attempts", it.rid, it.attempts)
            return []
        out = []
        for (it, req), res in zip(group, results, strict=True):
            if isinstance(res, TeacherError):
                out.append((it, encode_err(it.rid, res)))
                continue
            res.queue_ms = float(it.waited_ms)
            res.worker_id = self.worker_id
            stats = ReplyStats(res.batch_size, req.num_tokens, res.queue_ms, res.compute_ms)
            out.append((it, encode_ok(it.rid, res.wire_parts(), stats)))
        return out


ORPHAN_GRACE_S = 10.0
"""How long a worker whose supervisor died may take to finish its batch after SIGTERM before it exits anyway."""


def die_with_parent(parent_pid: int, grace_s: float = ORPHAN_GRACE_S) -> None:
    """SIGTERM to this process when `parent_pid` (its supervisor) dies, even by kill -9: the kernel's parent-death
    signal (Linux prctl PR_SET_PDEATHSIG) and, everywhere, a thread that watches the parent id (also covering a
    parent that died before the prctl). SIGTERM lets the worker finish its batch; what it holds is re-claimed.
    A graceful stop that has not ended `grace_s` after the parent died ends with `os._exit`: an orphan never
    lingers (one outlived its supervisor by more than 20 s once, on a loaded CI machine)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        log.warning("the supervisor (pid %s) is gone; stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        log.error("still running %.0f s after the supervisor died; exiting now", grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_worker(settings: TeacherSettings, parent_pid: int | None = None) -> None:
    """Entry point of one worker process: loads the engine, then serves until SIGTERM/SIGINT (or, when it was
    started by a supervisor `parent_pid`, until that one dies)."""
    import torch

    if parent_pid is not None:
        die_with_parent(parent_pid)

    from services.teacher.engine import build_engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // max(1, settings.workers))
    torch.set_num_threads(threads)
    worker = Worker(build_engine(settings.engine_spec()), settings)
    worker.install_signal_handlers()
    worker.run()
