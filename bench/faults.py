"""The fault suite: faults injected under a steady load of several jobs, with the figures that show what survived.

    python bench/faults.py            # every scenario (10-15 min on 2 cores): bench/results/faults.{md,json}
    python bench/faults.py --quick    # a worker kill -9 then a Redis restart without persistence (~40 s)

Scenarios (each on a fresh stack: its own Redis, a front-end, two separate workers, tiny local models):
- `worker-kill-9`: kill -9 of a worker, repeatedly, a replacement started each time (the next kill once it
  serves, so one worker of two is down at a time);
- `redis-restart-aof` / `redis-restart-none`: kill -9 of Redis and a restart, with an fsync-always append-only
  file (the queue survives) and with no persistence (the queue is lost: the clients' retries must recover it);
- `frontend-restart`: kill -9 of the front-end and a new one on the same ports, while a trainer streams;
- `trainer-kill-9`: kill -9 of a trainer after a checkpoint, then `--resume`.
For each: requests sent, answered, lost (sent - answered: must be 0), answered twice to a client (answers on
the wire for a request that already had one: must be 0), wrong answers (against a direct forward pass of the
same request: must be 0) and recovery time (the longest any job went without an answer after the fault: from
the fault, or from an answer after it, to the next answer; for trainers, from the fault to the next training
step). A trainer's "wrong" counts steps whose metrics differ from an uninterrupted run
with the same seed.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultlib import Stack, TrainerRun, differing_steps, tiny_models  # noqa: E402
from loadgen import Load  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Figures:
    fault: str
    faults: int
    sent: int
    answered: int
    lost: int
    twice: int
    wrong: int
    recovery_s: float
    """The worst over the faults of this scenario."""
    max_latency_s: float
    """The slowest chunk of requests (a dead worker's batch waits for its lease to expire); NaN: not measured."""
    retried: int
    note: str = ""


def _load_figures(name: str, load: Load, engine, fault_times: list[float], note: str = "") -> Figures:
    sent, answered = sum(t.sent for t in load.tallies), load.answered()
    stats = load.stats()
    errors = sum((t.errors for t in load.tallies), collections.Counter())
    if errors:  # what the unanswered requests got instead, by status code
        note = "; ".join(filter(None, [note, "errors: " + ", ".join(f"{k} x{n}" for k, n in errors.items())]))
    return Figures(
        fault=name,
        faults=len(fault_times),
        sent=sent,
        answered=answered,
        lost=sent - answered,
        twice=stats.get("duplicates", 0),
        wrong=load.wrong_answers(engine),
        recovery_s=round(max(load.recovery_s(t) for t in fault_times), 2),
        max_latency_s=round(max(x for t in load.tallies for x in t.latencies), 2),
        retried=stats.get("retried", 0),
        note=note,
    )


def under_load(
    name: str,
    stack: Stack,
    engine,
    jobs: int,
    inject,
    warm_s: float = 2.0,
    settle_s: float = 3.0,
    streams: int = 2,
    note: str = "",
) -> Figures:
    """Starts `jobs` jobs, lets them run, calls `inject(stack) -> fault times`, settles, stops, counts."""
    load = Load(stack.target, jobs, streams=streams, pace_s=0.1).start()
    try:
        time.sleep(warm_s)
        fault_times = inject(stack)
        time.sleep(settle_s)
    finally:
        load.stop()
    return _load_figures(name, load, engine, fault_times, note)


def worker_kills(kills: int, every_s: float):
    def inject(stack: Stack) -> list[float]:
        times = []
        for _ in range(kills):
            times.append(time.monotonic())
            stack.kill_worker(0)  # the oldest
            stack.wait_workers(stack.n_workers)  # the replacement serves: one worker down at a time
            time.sleep(every_s)
        return times

    return inject


def redis_restart(stack: Stack) -> list[float]:
    t = time.monotonic()
    stack.restart_redis()
    return [t]


def quick_faults(stack: Stack) -> list[float]:
    """One worker kill -9, then a Redis restart without persistence: the fast part run by `make test`."""
    times = worker_kills(1, every_s=1.5)(stack)
    return times + redis_restart(stack)


def frontend_restart_with_trainer(stack: Stack, student: Path, folder: Path, reference: list[dict]):
    """Front-end kill -9 + restart while a trainer streams; returns (fault times, trainer figures)."""
    run = TrainerRun(student, stack.target, folder / "fe-trainer", steps=20)
    while run.steps_done() < 4 and run.proc.alive():
        time.sleep(0.05)
    t = time.monotonic()
    steps_before = run.steps_done()
    stack.restart_frontend()
    while run.steps_done() <= steps_before and run.proc.alive():
        time.sleep(0.05)
    recovery = time.monotonic() - t
    code = run.wait()
    rows = run.rows()
    return [t], _trainer_figures("frontend-restart (the trainer)", rows, reference, code, recovery)


def _trainer_figures(
    name: str, rows: list[dict], reference: list[dict], code: int, recovery: float
) -> Figures:
    requests = int(sum(r.get("teacher/requests", 0) for r in rows))
    expected = int(sum(r.get("teacher/requests", 0) for r in reference))
    return Figures(
        fault=name,
        faults=1,
        sent=expected,
        answered=requests,
        lost=max(0, expected - requests),
        twice=0,
        wrong=differing_steps(reference, rows),
        recovery_s=round(recovery, 2),
        max_latency_s=float("nan"),
        retried=int(sum(r.get("teacher/retries", 0) for r in rows)),
        note=f"exit {code}; {sum('progress/prefix_length' in r for r in rows)} steps, metrics vs an uninterrupted run",
    )


def trainer_kill(stack: Stack, student: Path, folder: Path, reference: list[dict]) -> Figures:
    """kill -9 of a trainer after its step-6 checkpoint, then --resume to the end."""
    run = TrainerRun(student, stack.target, folder / "killed", steps=12, save_every=3)
    while not (folder / "killed" / "checkpoints" / "step-000006").exists() and run.proc.alive():
        time.sleep(0.02)
    t = time.monotonic()
    run.proc.signal(signal.SIGKILL)
    run.wait(10)
    resumed = TrainerRun(student, stack.target, folder / "killed", steps=12, save_every=3, resume=True)
    while not resumed.wrote_step_after(6, since=t) and resumed.proc.alive():
        time.sleep(0.05)
    recovery = time.monotonic() - t
    code = resumed.wait()
    return _trainer_figures("trainer-kill-9 (resumed)", resumed.rows(), reference, code, recovery)


def redis_outage_with_trainer(folder: Path, down_s: float = 60.0, steps: int = 10) -> Figures:
    """Redis (no persistence) down for `down_s` while a trainer streams, then back empty: the trainer, with the
    client's default retry budget, must finish with the metrics of an uninterrupted run (tests/test_faults.py)."""
    teacher, student = tiny_models(folder / "models")
    stack = Stack(teacher, folder / "outage").start()
    try:
        reference = reference_run(stack, student, folder, steps)
        run = TrainerRun(student, stack.target, folder / "outage-trainer", steps=steps)
        while run.steps_done() < 3 and run.proc.alive():
            time.sleep(0.05)
        t = time.monotonic()
        steps_before = run.steps_done()
        stack.restart_redis(down_s=down_s)
        while run.steps_done() <= steps_before and run.proc.alive():
            time.sleep(0.05)
        recovery = time.monotonic() - t
        code = run.wait()
        return _trainer_figures(
            f"redis-down-{down_s:.0f}s (the trainer)", run.rows(), reference, code, recovery
        )
    finally:
        stack.stop()


def reference_run(stack: Stack, student: Path, folder: Path, steps: int, save_every: int = 0) -> list[dict]:
    run = TrainerRun(student, stack.target, folder / f"reference-{steps}", steps=steps, save_every=save_every)
    assert run.wait() == 0, run.proc.tail()
    return run.rows()


def scenarios(folder: Path, quick: bool, jobs: int, only: str = "") -> list[Figures]:
    from services.teacher.engine import load_engine

    teacher, student = tiny_models(folder / "models")
    engine = load_engine(str(teacher))
    out: list[Figures] = []
    plan = [("worker-kill-9 + redis-restart-none", False)]
    if not quick:
        plan = [
            ("worker-kill-9", False),
            ("redis-restart-aof", True),
            ("redis-restart-none", False),
            ("frontend-restart", False),
            ("trainer-kill-9", False),
        ]
        plan = [(name, aof) for name, aof in plan if not only or name == only]
    for name, aof in plan:
        stack = Stack(teacher, folder / name, aof=aof).start()
        try:
            out += _one(name, stack, engine, student, folder / name, quick, jobs)
        finally:
            stack.stop()
        print(json.dumps([asdict(f) for f in out[-2:] if f.fault.startswith(name)]), flush=True)
    return out


def _one(
    name: str, stack: Stack, engine, student: Path, folder: Path, quick: bool, jobs: int
) -> list[Figures]:
    if quick:
        return [under_load(name, stack, engine, jobs, quick_faults, warm_s=1.0, settle_s=2.0, streams=1)]
    if name == "worker-kill-9":
        return [under_load(name, stack, engine, jobs, worker_kills(6, every_s=1.0))]
    if name.startswith("redis-restart"):
        return [under_load(name, stack, engine, jobs, redis_restart, settle_s=4.0)]
    if name == "frontend-restart":
        reference = reference_run(stack, student, folder, 20)
        box = {}

        def inject(s: Stack) -> list[float]:
            times, box["trainer"] = frontend_restart_with_trainer(s, student, folder, reference)
            return times

        figures = under_load(name, stack, engine, jobs, inject)
        figures.note = f"the new front-end served {stack.last_start_s:.1f} s after the kill"
        return [figures, box["trainer"]]
    reference = reference_run(stack, student, folder, 12, save_every=3)
    box = {}

    def inject_trainer(s: Stack) -> list[float]:
        t = time.monotonic()
        box["trainer"] = trainer_kill(s, student, folder, reference)
        return [t]

    load_figures = under_load(name + " (other jobs)", stack, engine, jobs, inject_trainer)
    return [box["trainer"], load_figures]


def markdown(figures: list[Figures]) -> str:
    head = (
        "| fault | faults | requests sent | answered | lost | answered twice | wrong | recovery (s) "
        "| slowest chunk (s) | retries | note |"
    )
    lines = [head, "|" + "---|" * 11]
    for f in figures:
        slowest = "" if f.max_latency_s != f.max_latency_s else f.max_latency_s  # NaN: not measured
        lines.append(
            f"| {f.fault} | {f.faults} | {f.sent} | {f.answered} | {f.lost} | {f.twice} | {f.wrong} | "
            f"{f.recovery_s} | {slowest} | {f.retried} | {f.note} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="one worker kill then one Redis restart, on one stack"
    )
    ap.add_argument("--jobs", type=int, default=3, help="student jobs of the steady load")
    ap.add_argument("--out", type=Path, default=RESULTS / "faults", help="writes OUT.md and OUT.json")
    ap.add_argument("--only", default="", help="one scenario by name, e.g. frontend-restart (default: all)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pd-faults-") as tmp:
        figures = scenarios(Path(tmp), args.quick, args.jobs, args.only)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps([asdict(f) for f in figures], indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(figures))
    print(markdown(figures))
    bad = [f.fault for f in figures if f.lost or f.twice or f.wrong]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
