"""The pieces the fault suite breaks: a teacher stack (its own Redis, a front-end, separate workers) and trainer
runs as child processes, all on loopback with tiny local models.

`Stack` starts and restarts each part on the same ports and data folder, so a restart is what an operator's
supervisor would do. `TrainerRun` runs `python -m trainer train` and watches its metrics.jsonl grow.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from services.teacher.launch import ChildProcess, TeacherProcess, child_env
from services.teacher.redis_server import RedisProcess

STACK_FLAGS = {"visibility-timeout-s": "2", "worker-ttl-s": "2", "max-batch-size": "16"}


def tiny_models(folder: Path) -> tuple[Path, Path]:
    """(teacher, student): two tiny random Llamas sharing one tokenizer, built once into `folder`."""
    from services.models.tiny import build_tiny

    teacher, student = folder / "teacher", folder / "student"
    if not (teacher / "config.json").exists():
        build_tiny(teacher, layers=2, hidden=128, seed=1, init_std=0.2)
    if not (student / "config.json").exists():
        build_tiny(student, layers=2, hidden=64, seed=2, init_std=0.02)
    return teacher, student


class Stack:
    """Redis (AOF or none) + a teacher front-end + `workers` separate worker processes, under `folder`."""

    def __init__(self, model: Path, folder: Path, *, workers: int = 2, aof: bool = False, flags=None) -> None:
        self.model, self.folder = model, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.redis = RedisProcess(workdir=str(folder / "redis"), aof=aof)
        (folder / "redis").mkdir(exist_ok=True)
        self.flags = {**STACK_FLAGS, **(flags or {})}
        self.n_workers = workers
        self.front: TeacherProcess | None = None
        self.workers: list[ChildProcess] = []
        self._logs = 0

    def _log(self, name: str) -> Path:
        self._logs += 1
        return self.folder / f"{self._logs:02d}-{name}.log"

    def start(self) -> Stack:
        self.redis.start()
        self.front = TeacherProcess(
            self.model, self.redis.url, self._log("frontend"), mode="frontend", flags=self.flags
        )
        for _ in range(self.n_workers):
            self.add_worker()
        self.front.wait_healthy(120)
        return self

    @property
    def target(self) -> str:
        return self.front.target

    def add_worker(self) -> ChildProcess:
        w = ChildProcess(self.front.worker_args({"torch-threads": "1"}), self._log("worker"))
        self.workers.append(w)
        return w

    def kill_worker(self, i: int = 0) -> None:
        """kill -9 of worker `i`, and a replacement (as a supervisor would start)."""
        w = self.workers.pop(i)
        w.signal(signal.SIGKILL)
        w.p.wait()
        w.stop()
        self.add_worker()

    def wait_workers(self, n: int, timeout_s: float = 120.0) -> None:
        """Until the front-end counts `n` live workers (after a kill: once the dead one's TTL has run out)."""
        import httpx

        time.sleep(float(self.flags["worker-ttl-s"]) + 0.5)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                if httpx.get(self.front.http + "/healthz", timeout=2).json().get("workers", 0) >= n:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"fewer than {n} workers after {timeout_s:.0f} s")

    def restart_redis(self, down_s: float = 0.5) -> None:
        """kill -9 of Redis, then the same server (port, data folder) again."""
        self.redis.stop()
        time.sleep(down_s)
        self.redis.start(timeout_s=30)

    def restart_frontend(self, down_s: float = 1.0) -> None:
        """kill -9 of the front-end, then a new one on the same ports."""
        old = self.front
        old.signal(signal.SIGKILL)
        old.p.wait()
        old.stop()
        time.sleep(down_s)
        self.front = TeacherProcess(  # same ports and flags: clients keep their target
            self.model,
            self.redis.url,
            self._log("frontend"),
            mode="frontend",
            flags=self.flags,
            grpc_port=old.grpc_port,
            http_port=old.http_port,
        )
        t0 = time.monotonic()
        self.front.wait_healthy(120)
        self.last_start_s = time.monotonic() - t0 + down_s

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        if self.front is not None:
            self.front.stop()
        self.redis.stop()


TRAIN_ARGS = [
    "progress_bar=false",
    "tensorboard=false",
    "max_new_tokens=16",
    "eval.max_new_tokens=16",
    "eval.head_tokens=8",
    "eval.prompts=4",
    "batch_size=4",
    "micro_batch_size=2",
    "loss=reverse_kl_topk",
    "top_k=8",
    "prefix.schedule=constant",
    "prefix.length=8",
    "lr=3e-3",
    "seed=3",
]


class TrainerRun:
    """`python -m trainer train` against a teacher, as a child process; `rows()` reads its metrics.jsonl."""

    def __init__(
        self, student: Path, target: str, out: Path, steps: int, *, save_every: int = 0, resume: bool = False
    ) -> None:
        self.out = out
        args = [
            sys.executable,
            "-m",
            "trainer",
            "train",
            *[
                x
                for kv in [
                    *TRAIN_ARGS,
                    f"student={student}",
                    f"teacher={target}",
                    f"output_dir={out}",
                    f"steps={steps}",
                    f"save_every={save_every}",
                ]
                for x in ("--set", kv)
            ],
        ]
        out.mkdir(parents=True, exist_ok=True)
        log = out.parent / f"{out.name}{'-resume' if resume else ''}.log"
        self.proc = ChildProcess([*args, "--resume"] if resume else args, log, env=child_env())

    def rows(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wrote_step_after(self, step: int, since: float) -> bool:
        """Whether this run has written a training step past `step` since `since` (time.monotonic)."""
        path = self.out / "metrics.jsonl"
        if not path.exists() or path.stat().st_mtime < time.time() - (time.monotonic() - since):
            return False
        return any("progress/prefix_length" in r and r.get("step", 0) > step for r in self.rows())

    def steps_done(self) -> int:
        return sum(1 for r in self.rows() if "progress/prefix_length" in r)

    def wait(self, timeout_s: float = 300.0) -> int:
        end = time.monotonic() + timeout_s
        while self.proc.alive() and time.monotonic() < end:
            time.sleep(0.1)
        return self.proc.stop(5)


def comparable(rows: list[dict]) -> list[dict]:
    """A run's metrics without timing and traffic counters, nor the teacher's FLOPs (they depend on which prompts
    the teacher already kept, see prompt reuse): equal for two runs that saw the same answers."""
    skip = (
        "time/",
        "teacher/",
        "eval/seconds",
        "flops/teacher",
        "flops/cum_teacher",
        "flops/total",
        "flops/cum_total",
    )
    return [{k: v for k, v in r.items() if not k.startswith(skip)} for r in rows]


def differing_steps(a: list[dict], b: list[dict], rel: float = 1e-4) -> int:
    """Rows of two runs' comparable metrics that differ (or are missing)."""
    bad = abs(len(a) - len(b))
    for x, y in zip(comparable(a), comparable(b), strict=False):
        same = x.keys() == y.keys() and all(
            abs(float(x[k]) - float(y[k])) <= rel * max(1.0, abs(float(x[k])))
            for k in x
            if isinstance(x[k], (int, float))
        )
        bad += not same
    return bad
