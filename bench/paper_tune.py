"""The learning-rate sweep of the paper table, on the validation split only: its choices are committed and read.

For every task and method, one seed (0) at each learning rate of LR_GRID, trained as the benchmark trains
(bench/paper_methods.py COMMON) but evaluated on the task's validation split (compositional, disjoint from
the held-out split, which this never reads). A method's rate is the one with the best final validation
accuracy; within one point of it, the one with the best agreement with the teacher; then the smaller rate.
Writes bench/paper_lr.json (the grid, every figure, the choice), which bench/paper_table.py reads.

    .venv/bin/python bench/paper_tune.py                              # every task and method (~50 minutes a task on 2 cores)
    .venv/bin/python bench/paper_tune.py --tasks route --methods full,prefix-L8   # merged into the file
    .venv/bin/python bench/paper_tune.py --reuse docs/results/paper_budget.json   # its matching runs not rerun

`--reuse` takes runs already recorded with the same training (validation split, seed 0, the same number of
steps; how often a run was evaluated does not change its training: evaluation is greedy and draws nothing)
instead of training them again; each reused trial names its source.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.paper_methods import LR_GRID, RUN, TASKS, common  # noqa: E402
from bench.paper_runs import Cell, run_cells  # noqa: E402

CHOICES = ROOT / "bench" / "paper_lr.json"
WITHIN = 0.01
FINAL_ONLY = ("eval.every=0",)
"""The sweep reads only the final evaluation."""


def choose(trials: list[dict]) -> float:
    """The chosen rate of one method's trials (each {lr, accuracy, agreement}), by the rule of the docstring."""
    best = max(t["accuracy"] for t in trials)
    close = [t for t in trials if t["accuracy"] >= best - WITHIN]
    return max(close, key=lambda t: (t["agreement"], -t["lr"]))["lr"]


def load_choices(path: Path = CHOICES) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"grid": list(LR_GRID), "tasks": {}}


def chosen_lr(task: str, method: str, path: Path = CHOICES) -> float:
    """The sweep's rate for one method; KeyError naming what to run when it has not been swept."""
    try:
        return load_choices(path)["tasks"][task][method]["lr"]
    except KeyError:
        raise KeyError(
            f"no tuned learning rate for {task}/{method} in {path}: run bench/paper_tune.py --tasks {task} "
            f"--methods {method}"
        ) from None


def reusable(paths: list[Path]) -> dict[tuple, dict]:
    """(task, method, lr) -> a recorded validation run of seed 0 trained for COMMON's steps, from `paths`."""
    out = {}
    for path in paths:
        data = json.loads(path.read_text())
        if data.get("steps") != common("steps"):
            continue
        for r in data["records"]:
            if r["split"] == "validation" and r["seed"] == 0:
                out[(r["task"], r["method"], r["lr"])] = r | {"source": str(path.relative_to(ROOT))}
    return out


def trial(r: dict) -> dict:
    out = {k: r[k] for k in ("lr", "accuracy", "agreement", "execution")} | {"flops": r["flops"]["total"]}
    return out | ({"source": r["source"]} if "source" in r else {})


SWEEP_MD = ROOT / "docs" / "results" / "paper_sweep.md"


def sweep_table(data: dict) -> str:
    """docs/results/paper_sweep.md: every trial of the sweep, the chosen rate in bold."""
    lines = [
        "# The learning-rate sweep of the paper table (validation split, seed 0)",
        "",
        f"Grid {', '.join(f'{lr:g}' for lr in data['grid'])}; {common('steps')} steps of 32 rollouts; the final "
        "evaluation on 252 validation prompts (compositional: no held-out prompt's digit pair). The rule, fixed "
        f"before the runs (bench/paper_tune.py): the best final accuracy; within {100 * WITHIN:g} point of it, the "
        "best agreement; then the smaller rate. Written by `bench/paper_tune.py` from bench/paper_lr.json.",
        "",
    ]
    for task, methods in data["tasks"].items():
        lines += [f"## builtin:{task}", "", "| method | lr | accuracy % | agreement % | execution % | FLOPs |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for method, v in methods.items():
            for t in v["trials"]:
                mark = "**" if t["lr"] == v["lr"] else ""
                lines.append(
                    f"| {method} | {mark}{t['lr']:g}{mark} | {100 * t['accuracy']:.1f} | {100 * t['agreement']:.1f} "
                    f"| {100 * t['execution']:.1f} | {t['flops']:.2g} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(RUN))
    parser.add_argument("--jobs", type=int, default=2, help="Runs in parallel (one torch thread each).")
    parser.add_argument("--out", type=Path, default=CHOICES)
    parser.add_argument("--reuse", type=Path, action="append", default=[], help="Recorded runs to reuse.")
    parser.add_argument("--report-only", action="store_true", help="Rewrite paper_sweep.md from the JSON.")
    args = parser.parse_args()
    if args.report_only:
        SWEEP_MD.write_text(sweep_table(load_choices(args.out)))
        return

    from rich.console import Console

    from services.util.progress import quiet_progress_bars

    quiet_progress_bars()
    console = Console(stderr=True)
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    known = reusable([p.resolve() for p in args.reuse])
    wanted = [(t, m, lr) for t in tasks for m in methods for lr in LR_GRID]
    cells = [Cell(t, m, lr, 0, "validation", FINAL_ONLY) for t, m, lr in wanted if (t, m, lr) not in known]
    console.print(f"{len(cells)} runs to train, {len(wanted) - len(cells)} reused")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="paper-tune-") as tmp:
        records = run_cells(cells, Path(tmp), args.jobs, console.print)
    records += [known[w] for w in wanted if w in known]
    data = load_choices(args.out)
    data["grid"] = list(LR_GRID)
    data.setdefault("wall_s", {})[f"{args.tasks}:{args.methods}"] = round(time.perf_counter() - t0)
    for task in tasks:
        for method in methods:
            mine = [r for r in records if r["task"] == task and r["method"] == method]
            trials = [trial(r) for r in sorted(mine, key=lambda r: r["lr"])]
            data["tasks"].setdefault(task, {})[method] = {"lr": choose(trials), "trials": trials}
            console.print(f"[{task}] {method}: lr {data['tasks'][task][method]['lr']:g}")
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    SWEEP_MD.write_text(sweep_table(data))


if __name__ == "__main__":
    main()
