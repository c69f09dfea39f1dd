"""The paper's table on the testbed: full OPD against prefix OPD, its mitigations and the trivial baselines.

For each decision task (builtin:route, where the first token decides the answer; builtin:relay, where a
different decision is taken in each of 4 blocks), from the same warmed-up student, with the same prompts,
batch and number of steps, every method of bench/paper_methods.py trains through the real teacher service (an
embedded Redis and `teacher serve` on loopback) at the learning rate the validation sweep chose
(bench/paper_lr.json, bench/paper_tune.py), 3 seeds each, and is evaluated on the held-out split every 50
steps: accuracy (validity), agreement with the teacher's decisions, and execution (accuracy with the teacher's
decision forced). The trivial baselines (forced first tags, banned tokens, constant tags) come from
docs/results/shortcuts.json (bench/shortcuts.py) as rows of the same table. Before training it measures the
paper's motivating analyses on the student's start (teacher-prefix rescue, KL by position). Writes, under --out
(default docs/results): paper_table.md / .json / .png, rescue.md / .png, kl_position.md / .png.

    .venv/bin/python bench/paper_table.py                          # the benchmark (~1.5 hours on 2 cores)
    .venv/bin/python bench/paper_table.py --methods full --seeds 0 --tasks route   # one cell, to re-check it
    .venv/bin/python bench/paper_table.py --quick --out /tmp/quick # the pipeline in ~3 minutes
    .venv/bin/python bench/paper_table.py --report-only            # the report again from the JSON
    .venv/bin/python bench/paper_table.py --combine A/paper_table.json,B/paper_table.json   # one report of
                                                                   # runs made task by task
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.paper_methods import COMMON, RUN, TASKS, common  # noqa: E402
from bench.paper_runs import Cell, run_cells, teacher_service  # noqa: E402

RESCUE_LENGTHS = (0, 1, 2, 8, 32, 64, 112)
QUICK = ("steps=4", "eval.every=2", "eval.prompts=12", "batch_size=4", "micro_batch_size=4")


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
    max_new = common("max_new_tokens")
    try:
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
    from dataclasses import asdict

    return {"rescue": rescue.accuracy, "rescue_examples": rescue.examples, "kl_by_position": asdict(kl)}


def start_analyses(tasks: list[str], work: Path, quick: bool, say) -> dict:
    from services.models.testbed import prepare_pair

    out = {}
    for task in tasks:
        pair = prepare_pair(task)
        with teacher_service(pair.teacher, work / f"teacher-{task}-analyses.log") as target:
            out[task] = analyses(pair.student, target, task, quick)
        say(f"[{task}] rescue: " + ", ".join(f"L={k}: {v:.2f}" for k, v in out[task]["rescue"].items()))
    return out


def cells_for(tasks, methods, seeds, quick: bool) -> list[Cell]:
    from bench.paper_tune import chosen_lr

    def lr(task, method):
        return 1e-3 if quick else chosen_lr(task, method)

    extra = QUICK if quick else ()
    return [Cell(t, m, lr(t, m), s, "heldout", extra) for t in tasks for m in methods for s in seeds]


def combine(parts: list[dict]) -> dict:
    """One benchmark record from several made with the same settings (e.g. one task at a time)."""
    metas = [p["meta"] for p in parts]
    for key in ("quick", "common"):
        assert all(m[key] == metas[0][key] for m in metas), f"--combine: the runs differ in {key}"
    # a task's seeds are those of all its parts (seed 2 of a method may come apart from 0 and 1)
    by_task: dict[str, set[int]] = {}
    for p in parts:
        for r in p["records"]:
            by_task.setdefault(r["task"], set()).add(r["seed"])
    cells = [(r["task"], r["method"], r["seed"]) for p in parts for r in p["records"]]
    assert len(cells) == len(set(cells)), "--combine: a (task, method, seed) run appears twice"
    meta = metas[0] | {
        "wall_s": sum(m["wall_s"] for m in metas),
        "date": max(m["date"] for m in metas),
        "seeds": sorted({s for m in metas for s in m["seeds"]}),
        "seeds_by_task": {task: sorted(seeds) for task, seeds in by_task.items()},
    }
    analyses = {task: a for p in parts for task, a in p["analyses"].items()}
    return {"meta": meta, "analyses": analyses, "records": [r for p in parts for r in p["records"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="One seed, 4 steps, 12 prompts, lr 1e-3.")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(RUN))
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds.")
    parser.add_argument("--jobs", type=int, default=2, help="Runs in parallel (one torch thread each).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument(
        "--no-analyses", action="store_true", help="Skip the rescue and KL-by-position analyses."
    )
    parser.add_argument(
        "--report-only", action="store_true", help="Rewrite the report from OUT/paper_table.json."
    )
    parser.add_argument(
        "--combine",
        default="",
        help="Comma-separated paper_table.json files (e.g. one per task): one report.",
    )
    args = parser.parse_args()
    from bench.paper_report import write_report

    if args.combine:
        data = combine([json.loads(Path(p).read_text()) for p in args.combine.split(",")])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "paper_table.json").write_text(json.dumps(data, indent=1) + "\n")
        print(write_report(data, args.out))
        return

    if args.report_only:
        print(write_report(json.loads((args.out / "paper_table.json").read_text()), args.out))
        return
    from rich.console import Console

    from services.util.progress import quiet_progress_bars

    quiet_progress_bars()
    console = Console(stderr=True)
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="paper-table-") as tmp:
        before = {} if args.no_analyses else start_analyses(tasks, Path(tmp), args.quick, console.print)
        records = run_cells(cells_for(tasks, methods, seeds, args.quick), Path(tmp), args.jobs, console.print)
    meta = {
        "quick": args.quick,
        "seeds": seeds,
        "wall_s": round(time.perf_counter() - t0, 1),
        "common": COMMON,
        "date": time.strftime("%Y-%m-%d"),
        "cpu": __import__("bench.shortcuts", fromlist=["cpu_name"]).cpu_name(),
    }
    data = {"meta": meta, "analyses": before, "records": records}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_table.json").write_text(json.dumps(data, indent=1) + "\n")
    print(write_report(data, args.out))


if __name__ == "__main__":
    main()
