"""Does any method learn the decision with a longer budget? Validation split only (the held-out split untouched).

The table's budget (200 steps, bench/paper_methods.py COMMON) moved no method's agreement with the teacher off
chance on route's validation split (bench/paper_lr.json). This runs a few methods for STEPS steps at their swept
rate, evaluated every STEPS / 8 steps on validation, and writes OUT/paper_budget.{md,json}: final accuracy,
agreement and execution, the best agreement on the way, and the FLOPs.

    .venv/bin/python bench/paper_budget.py --task route --methods full,full@3e-3,tail-L8 --steps 600
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.paper_runs import Cell, run_cells  # noqa: E402
from bench.paper_tune import chosen_lr  # noqa: E402


def table(records: list[dict], steps: int, cpu: str) -> str:
    lines = [
        f"# A longer budget: {steps} steps of 32 rollouts, validation split ({cpu})",
        "",
        "| method | lr | accuracy | agreement | execution | best agreement (step) | FLOPs | wall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        best = (
            max(r["curve"], key=lambda p: p["agreement"])
            if r["curve"]
            else {"agreement": float("nan"), "step": 0}
        )
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['start']['accuracy']:.3f} -> {r['accuracy']:.3f} | "
            f"{r['start']['agreement']:.3f} -> {r['agreement']:.3f} | {r['execution']:.3f} | "
            f"{best['agreement']:.3f} ({best['step']}) | {r['flops']['total']:.3g} | {r['seconds']['wall']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="route")
    parser.add_argument(
        "--methods", default="full,full@3e-3,tail-L8", help="METHOD or METHOD@LR, comma-separated."
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    from bench.shortcuts import cpu_name
    from services.util.progress import quiet_progress_bars

    quiet_progress_bars()
    over = (f"steps={args.steps}", f"eval.every={args.steps // 8}")
    cells = []
    for spec in args.methods.split(","):  # METHOD (its swept rate) or METHOD@LR
        method, _, lr = spec.partition("@")
        cells.append(
            Cell(args.task, method, float(lr) if lr else chosen_lr(args.task, method), 0, "validation", over)
        )
    t0 = time.perf_counter()
    work = Path("/tmp") / f"paper-budget-{args.task}"
    work.mkdir(exist_ok=True)
    records = run_cells(cells, work, args.jobs, print)
    data = {
        "task": args.task,
        "steps": args.steps,
        "cpu": cpu_name(),
        "wall_s": round(time.perf_counter() - t0),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_budget.json").write_text(json.dumps({**data, "records": records}, indent=1) + "\n")
    (args.out / "paper_budget.md").write_text(table(records, args.steps, data["cpu"]))
    print(table(records, args.steps, data["cpu"]))


if __name__ == "__main__":
    main()
