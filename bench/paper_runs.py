"""One cell of the paper table (a task, a method, a learning rate, a seed), run through the real teacher service.

Shared by the benchmark (bench/paper_table.py, held-out split) and the learning-rate sweep (bench/paper_tune.py,
validation split). Cells of one task run in parallel worker processes (one torch thread each) against one
teacher service (an embedded Redis and `teacher serve`, 1 worker) on loopback.
"""

from __future__ import annotations

import contextlib
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.paper_methods import COMMON, METHODS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CURVE_KEYS = ("eval/accuracy", "eval/agreement", "eval/execution")


@dataclass(frozen=True)
class Cell:
    task: str
    method: str
    lr: float
    seed: int
    split: str = "heldout"
    """heldout (the benchmark) or validation (the sweep)."""
    overrides: tuple[str, ...] = ()
    """Extra settings (e.g. --quick's shorter runs)."""


@dataclass
class RunRecord:
    """One training run: what the tables and the plots need."""

    task: str
    method: str
    seed: int
    lr: float
    split: str
    accuracy: float
    agreement: float
    execution: float
    start: dict
    """accuracy / agreement / execution before training."""
    kl_head: float
    kl_tail: float
    flops: dict
    """sampling, teacher, training, total, teacher_saved (cumulative, the one ledger of every method)."""
    seconds: dict
    """sampling, teacher (waiting for its scores), training, evaluation, wall."""
    curve: list[dict] = field(default_factory=list)
    """{step, flops, accuracy, agreement, execution} at each evaluation (step 0 included)."""
    sample: dict | None = None


def settings(cell: Cell, student: Path, target: str, run_dir: Path) -> list[str]:
    job = re.sub(
        r"[^A-Za-z0-9._+-]", "-", f"{cell.task}-{cell.method}-lr{cell.lr:g}-s{cell.seed}-{cell.split}"
    )
    return [
        *COMMON,
        f"prompts=builtin:{cell.task}",
        f"eval.split={cell.split}",
        "eval.prompts=252",
        f"student={student}",
        f"teacher={target}",
        f"output_dir={run_dir}",
        f"job_id={job}",
        f"seed={cell.seed}",
        f"lr={cell.lr:g}",
        *METHODS[cell.method],
        *cell.overrides,
    ]


def _curve(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r.get("eval/accuracy") is not None and "flops/cum_total" in r:
            point = {"step": int(r["step"]), "flops": float(r["flops/cum_total"])}
            point |= {k.removeprefix("eval/"): float(r.get(k, float("nan"))) for k in CURVE_KEYS}
            out.append(point)
    return out


def _seconds(rows: list[dict], wall: float) -> dict:
    def total(key):
        return sum(float(r.get(key, 0.0)) for r in rows)

    return {
        "sampling": total("time/sample_s"),
        "teacher": total("teacher/wait_s"),
        "training": total("time/train_s"),
        "evaluation": total("eval/seconds"),
        "wall": wall,
    }


def run_cell(cell: Cell, student: str, target: str, work: str) -> dict:
    """Trains one cell against the service at `target`; its RunRecord as a dict (picklable across processes)."""
    import torch

    from trainer.config import load_config
    from trainer.loop import train
    from trainer.metrics import read_metrics

    torch.set_num_threads(1)
    run_dir = Path(work) / cell.task / f"{cell.method}-lr{cell.lr:g}-s{cell.seed}-{cell.split}"
    summary = train(load_config(None, settings(cell, Path(student), target, run_dir)))
    rows = read_metrics(run_dir)
    b, a, f = summary.before, summary.after, summary.flops
    nan = float("nan")
    record = RunRecord(
        task=cell.task,
        method=cell.method,
        seed=cell.seed,
        lr=cell.lr,
        split=cell.split,
        accuracy=a.get("eval/accuracy", nan),
        agreement=a.get("eval/agreement", nan),
        execution=a.get("eval/execution", nan),
        start={k.removeprefix("eval/"): b.get(k, nan) for k in CURVE_KEYS},
        kl_head=a.get("eval/kl_head", nan),
        kl_tail=a.get("eval/kl_tail", nan),
        flops={
            k: f.get(f"flops/cum_{k}", 0.0)
            for k in ("sampling", "teacher", "training", "total", "teacher_saved")
        },
        seconds=_seconds(rows, summary.wall_s),
        curve=_curve(rows),
        sample=summary.samples_after[0] if summary.samples_after else None,
    )
    return asdict(record)


@contextlib.contextmanager
def teacher_service(teacher_dir: Path, log: Path):
    """An embedded Redis and `teacher serve` (1 worker, 1 torch thread) on loopback; yields the gRPC target."""
    from services.teacher.launch import TeacherProcess
    from services.teacher.redis_server import RedisProcess

    with RedisProcess() as redis:
        proc = TeacherProcess(teacher_dir, redis.url, log, flags={"torch-threads": 1})
        try:
            proc.wait_healthy()
            yield proc.target
        finally:
            proc.stop()


def run_cells(cells: list[Cell], work: Path, jobs: int, say) -> list[dict]:
    """Every cell, task by task (one teacher service per task), `jobs` cells at a time; records in cell order."""
    from services.models.testbed import prepare_pair

    records: dict[Cell, dict] = {}
    for task in dict.fromkeys(c.task for c in cells):
        pair = prepare_pair(task)
        mine = [c for c in cells if c.task == task]
        with teacher_service(pair.teacher, work / f"teacher-{task}.log") as target:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futures = {c: pool.submit(run_cell, c, str(pair.student), target, str(work)) for c in mine}
                for c, fut in futures.items():
                    records[c] = r = fut.result()
                    say(
                        f"[{c.task}] {c.method:>13} lr {c.lr:g} seed {c.seed} ({c.split}): accuracy "
                        f"{r['start']['accuracy']:.3f} -> {r['accuracy']:.3f}, agreement {r['agreement']:.3f}, "
                        f"execution {r['execution']:.3f}, {r['flops']['total']:.3g} FLOPs, "
                        f"{r['seconds']['wall']:.0f} s"
                    )
    return [records[c] for c in cells]
