"""The paper's table on the testbed: full OPD vs prefix OPD vs a schedule vs off-policy prefixes vs SeqKD.

For each task (builtin:plan, where the first token decides the answer; builtin:chain, where a decision recurs
every 15 characters), from the same warmed-up student, with the same prompts and the same number of optimizer
steps, every method trains through the real teacher service (an embedded Redis and `teacher serve` on
loopback), 3 seeds each. Before training it measures the paper's motivating analyses on the student's start
(teacher-prefix rescue, KL by position); after training, the KL by position of `full` and of the best prefix
method. The report (bench/paper_report.py) writes, under --out (default docs/results):

    paper_table.md / .json / .png      the table, one record per run, accuracy against cumulative FLOPs
    rescue.md / .png                   teacher-prefix rescue curves
    kl_position.md / .png              mean reverse KL by answer position, before and after training

    .venv/bin/python bench/paper_table.py                 # the full benchmark (~60 minutes on 2 cores)
    .venv/bin/python bench/paper_table.py --quick --out /tmp/quick    # the pipeline, one seed, 3 steps (~2 min)
    .venv/bin/python bench/paper_table.py --report-only   # the report again from docs/results/paper_table.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.paper_methods import COMMON, methods_for  # noqa: E402

RESCUE_LENGTHS = (0, 2, 4, 8, 16, 32)


@dataclass
class RunRecord:
    """One training run: what the table and the plot need."""

    task: str
    method: str
    seed: int
    accuracy: float
    """Held-out accuracy after the last step, a fraction in [0, 1]."""
    accuracy_start: float
    kl_head: float
    kl_tail: float
    flops_sampling: float
    flops_teacher: float
    flops_training: float
    flops_total: float
    wall_s: float
    curve: list[tuple[float, float]] = field(default_factory=list)
    """(cumulative FLOPs, held-out accuracy) at each evaluation."""
    sample: dict | None = None


def train_one(
    task: str, method: str, overrides: list[str], seed: int, pair, target: str, work: Path, quick: bool
):
    """Runs one method with one seed against the service at `target`; returns its RunRecord and run folder."""
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.plot import eval_curve

    run_dir = work / task / f"{method}-s{seed}"
    settings = [
        *COMMON,
        f"prompts=builtin:{task}",
        f"student={pair.student}",
        f"teacher={target}",
        f"output_dir={run_dir}",
        f"job_id={re.sub(r'[^A-Za-z0-9._+-]', '-', f'{task}-{method}-s{seed}')}",
        f"seed={seed}",
        *overrides,
    ]
    if quick:
        settings += ["steps=3", "eval.every=0", "eval.prompts=8", "batch_size=4", "micro_batch_size=4"]
    summary = train(load_config(None, settings))
    flops, after = summary.flops, summary.after
    xs, ys = eval_curve(run_dir, "eval/accuracy")
    record = RunRecord(
        task=task,
        method=method,
        seed=seed,
        accuracy=after.get("eval/accuracy", float("nan")),
        accuracy_start=summary.before.get("eval/accuracy", float("nan")),
        kl_head=after.get("eval/kl_head", float("nan")),
        kl_tail=after.get("eval/kl_tail", float("nan")),
        flops_sampling=flops.get("flops/cum_sampling", 0.0),
        flops_teacher=flops.get("flops/cum_teacher", 0.0),
        flops_training=flops.get("flops/cum_training", 0.0),
        flops_total=flops.get("flops/cum_total", 0.0),
        wall_s=summary.wall_s,
        curve=list(zip(xs, ys, strict=True)),
        sample=summary.samples_after[0] if summary.samples_after else None,
    )
    return record, run_dir


def analyses(student_dir: Path, target: str, task: str, quick: bool) -> dict:
    """Rescue curve and KL by position of the model in `student_dir` on the task's held-out prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.teacher.client import ClientOptions
    from trainer.analysis import kl_by_position, rescue_curve
    from trainer.tasks import load_task, render
    from trainer.teacher_io import TeacherIO

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    held = load_task(f"builtin:{task}").heldout[: 16 if quick else None]
    ids = [render(ex, tokenizer) for ex in held]
    teacher = TeacherIO(target, ClientOptions())
    try:
        max_new = int(dict(s.split("=", 1) for s in COMMON)["max_new_tokens"])
        rescue = rescue_curve(
            model,
            tokenizer,
            held,
            ids,
            teacher,
            RESCUE_LENGTHS,
            max_new_tokens=max_new,
            job_id=f"{task}-rescue",
        )
        kl = kl_by_position(
            model, tokenizer, ids, teacher, max_new_tokens=max_new, vocab=len(tokenizer), job_id=f"{task}-kl"
        )
    finally:
        teacher.close()
    return {"rescue": rescue.accuracy, "rescue_examples": rescue.examples, "kl_by_position": asdict(kl)}


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


def run_task(task: str, seeds: list[int], quick: bool, work: Path, say) -> dict:
    """Every method and seed of one task, plus the analyses, against one teacher service."""
    from services.models.testbed import prepare_pair

    pair = prepare_pair(task)
    records: list[RunRecord] = []
    out: dict = {"task": task}
    with teacher_service(pair.teacher, work / f"teacher-{task}.log") as target:
        say(f"[{task}] analyses of the student's start ...")
        out["before"] = analyses(pair.student, target, task, quick)
        say(f"[{task}] rescue: " + ", ".join(f"L={k}: {v:.2f}" for k, v in out["before"]["rescue"].items()))
        finals: dict[str, Path] = {}
        for method, overrides in methods_for(task).items():
            for seed in seeds:
                t0 = time.perf_counter()
                record, run_dir = train_one(task, method, overrides, seed, pair, target, work, quick)
                records.append(record)
                finals.setdefault(method, run_dir / "final")
                say(
                    f"[{task}] {method:>18} seed {seed}: accuracy {record.accuracy_start:.3f} -> "
                    f"{record.accuracy:.3f}, {record.flops_total:.3g} FLOPs, {time.perf_counter() - t0:.0f} s"
                )
        from bench.paper_report import best_prefix_method

        out["after"] = {}
        for method in ("full", best_prefix_method(records, task)):
            if method in finals:
                out["after"][method] = analyses(finals[method], target, task, quick)
    out["records"] = [asdict(r) for r in records]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="One seed, 3 steps, 8 held-out prompts.")
    parser.add_argument("--tasks", default="plan,chain", help="Comma-separated testbed tasks.")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per method.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="Folder of the report.")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Rewrite the report from OUT/paper_table.json (no training).",
    )
    args = parser.parse_args()
    if args.report_only:
        from bench.paper_report import write_report

        data = json.loads((args.out / "paper_table.json").read_text())
        print(write_report(data["tasks"], data["meta"], args.out))
        return

    import torch
    from rich.console import Console

    from bench.paper_report import write_report
    from services.util.progress import quiet_progress_bars

    quiet_progress_bars()
    torch.set_num_threads(1)
    console = Console(stderr=True)
    seeds = [0] if args.quick else list(range(args.seeds))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="paper-table-") as tmp:
        results = [run_task(t, seeds, args.quick, Path(tmp), console.print) for t in args.tasks.split(",")]
    meta = {
        "quick": args.quick,
        "seeds": seeds,
        "wall_s": round(time.perf_counter() - t0, 1),
        "common": COMMON,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_table.json").write_text(
        json.dumps(
            {"meta": meta, "tasks": results, "records": [r for t in results for r in t["records"]]}, indent=1
        )
        + "\n"
    )
    print(write_report(results, meta, args.out))


if __name__ == "__main__":
    main()
