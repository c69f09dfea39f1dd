"""What the demo shows when its job is done: the before/after table, one answer whose decision changed to the
teacher's, the best trivial baseline, and the compute against full OPD.

Pure presentation over the run's summary (trainer.summary.RunSummary) and, when present, the benchmark's
records: docs/results/shortcuts.json (what a forced, banned or constant token scores without training) and
docs/results/paper_table.json (compute to reach full OPD's agreement, measured over seeds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
BENCHMARK = RESULTS / "paper_table.json"
SHORTCUTS = RESULTS / "shortcuts.json"

# What the results table shows, in order: (metric key, label, as a percentage?).
ROWS = (
    ("eval/accuracy", "held-out accuracy (valid answers)", True),
    ("eval/agreement", "agreement with the teacher's decisions", True),
    ("eval/execution", "execution (the teacher's decision forced)", True),
    ("eval/kl_head", "teacher KL, first 16 answer tokens", False),
    ("eval/kl_tail", "teacher KL, later tokens", False),
    ("eval/kl", "teacher KL, all positions", False),
    ("eval/response_tokens", "mean answer length (tokens)", False),
)


@dataclass
class DemoResult:
    """What a demo run produced (returned by `run_demo`, also written to `summary.json`)."""

    run_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    sample_before: dict | None
    sample_after: dict | None
    flops: dict[str, float]
    plots: list[Path]
    method: str = ""
    """The job in words (prefix length, anchors)."""
    full_opd: dict | None = None
    """The benchmark's compute to reach full OPD's agreement, for this job's method and for full (None without
    a benchmark record of the method)."""
    baseline: dict | None = None
    """The best trivial baseline of the task's starting student (docs/results/shortcuts.json), if measured."""
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        keys = (
            "before",
            "after",
            "sample_before",
            "sample_after",
            "flops",
            "method",
            "full_opd",
            "baseline",
            "timings_s",
        )
        body = {k: getattr(self, k) for k in keys}
        body["plots"] = [p.name for p in self.plots]
        return json.dumps(body, indent=2) + "\n"


def _decision(sample: dict) -> tuple[str | None, str | None]:
    """(the decision the answer took first, the teacher's preferred one) of a decision-task sample."""
    from services.models.decisions import DECISION_TASKS

    for task in DECISION_TASKS.values():
        if sample["prompt"].startswith(task.marker + " "):
            x = task.parse(sample["prompt"])
            return task.decisions(sample["response"])[0], task.teacher_tags(x)[0]
    return None, None


def pick_sample(before: list[dict], after: list[dict]) -> tuple[dict | None, dict | None]:
    """The same held-out prompt before and after: preferably one whose first decision moved to the teacher's
    and whose answer became correct, else one answered wrongly before and correctly after, else the first."""
    pairs = [(b, a) for b, a in zip(before, after, strict=False) if b["prompt"] == a["prompt"]]
    for b, a in pairs:
        (db, want), (da, _) = _decision(b), _decision(a)
        if want is not None and db != want and da == want and a.get("correct") is True:
            return b, a
    for b, a in pairs:
        if b.get("correct") is False and a.get("correct") is True:
            return b, a
    if pairs:
        return pairs[0]
    return (before[0] if before else None), (after[0] if after else None)


def best_baseline(task: str, path: Path = SHORTCUTS) -> dict | None:
    """The best prompt-independent shortcut on the task's starting student (held-out split), if measured."""
    if not path.exists():
        return None
    r = json.loads(path.read_text())["tasks"].get(task, {}).get("heldout")
    if not r:
        return None
    first = max(r["forced_first"].values())
    return {
        "forced_first": first,
        "banned": max(r["banned"].values()),
        "constant": r["best_constant"]["accuracy"],
        "student": r["student"],
    }


def full_opd_reference(task: str, method: str, path: Path = BENCHMARK) -> dict | None:
    """The benchmark's compute to reach full OPD's final agreement (- 2 points) for `method` and for `full`."""
    if not path.exists():
        return None
    from trainer.reach import by_method, final, reach_stats, reaches, targets

    data = json.loads(path.read_text())
    if data.get("meta", {}).get("quick"):
        return None
    groups = by_method(data.get("records", []), task)
    if "full" not in groups or method not in groups:
        return None
    target = targets(groups)["agreement"]
    full, mine = (
        reach_stats(groups["full"], "agreement", target),
        reach_stats(groups[method], "agreement", target),
    )
    return {
        "method": method,
        "target": target,
        "full_reach": full[0],
        "reach": mine[0],
        "reached": reaches(groups[method], "agreement", target),
        "reached_seeds": mine[2],
        "seeds": len(groups[method]),
        "final": final(groups[method], "agreement"),
    }


def print_results(console, result: DemoResult, steps: int) -> None:
    from rich.table import Table

    table = Table(title="the student on held-out prompts, before and after", title_justify="left")
    for name, justify in (("metric", "left"), ("before", "right"), ("after", "right"), ("change", "right")):
        table.add_column(name, justify=justify)
    for key, label, pct in ROWS:
        b, a = result.before.get(key), result.after.get(key)
        if b is None and a is None:
            continue
        scale, unit = (100.0, "%") if pct else (1.0, "")

        def cell(v, scale=scale, unit=unit):
            return "-" if v is None else f"{scale * v:.4g}{unit}"

        change = (
            f"{scale * (a - b):+.4g}{' points' if pct else ''}" if a is not None and b is not None else "-"
        )
        table.add_row(label, cell(b), cell(a), change)
    console.print(table)
    _print_sample(console, result)
    _print_compute(console, result, steps)


def _print_sample(console, result: DemoResult) -> None:
    b, a = result.sample_before, result.sample_after
    sample = a or b
    if not sample:
        return
    console.print(f"[bold]held-out prompt[/bold] {sample['prompt']!r}", highlight=False)
    for name, s in (("before", b), ("after", a)):
        if s:
            verdict = {True: "[green]correct[/green]", False: "[red]wrong[/red]", None: "unchecked"}[
                s["correct"]
            ]
            console.print(f"  {name:>6} ({verdict}): ", end="", highlight=False)
            console.print(repr(s["response"]), highlight=False, markup=False)


def _print_compute(console, result: DemoResult, steps: int) -> None:
    total = result.flops.get("flops/cum_total")
    if not total:
        return
    parts = ", ".join(
        f"{k.removeprefix('flops/cum_')} {v:.3g}"
        for k, v in result.flops.items()
        if not k.endswith(("total", "teacher_saved"))
    )
    console.print(f"training compute: {total:.3g} FLOPs ({parts})", highlight=False)
    b = result.baseline
    if b:
        console.print(
            f"trivial baselines (no training, held-out): forcing any fixed first tag: best "
            f"{100 * b['forced_first']:.1f}%; banning any one token: best {100 * b['banned']:.1f}%; the best "
            f"constant tags: {100 * b['constant']:.1f}% (the student alone: {100 * b['student']:.1f}%; "
            "docs/results/shortcuts.md)",
            highlight=False,
        )
    ref = result.full_opd
    if ref and ref["reached"]:
        console.print(
            f"compute to reach full OPD's agreement ({100 * ref['target']:.1f}%), from the benchmark "
            f"(docs/results/paper_table.md, {ref['reached_seeds']}/{ref['seeds']} seeds): `{ref['method']}` "
            f"{ref['reach']:.3g} FLOPs, full OPD {ref['full_reach']:.3g}: {ref['full_reach'] / ref['reach']:.1f}x "
            "less",
            highlight=False,
        )
    elif ref:
        console.print(
            f"`{ref['method']}` did not reach full OPD's agreement ({100 * ref['target']:.1f}%) in the benchmark "
            f"({ref['reached_seeds']}/{ref['seeds']} seeds, final mean {100 * ref['final']:.1f}%; "
            "docs/results/paper_table.md): this job shows the best trade-off measured, "
            "not a prefix setting that matches full OPD",
            highlight=False,
        )


def plot_training_kl(run_dir: Path) -> Path | None:
    """training_kl.png: the sampled reverse-KL estimate on the training prefixes, step by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if r.get("loss/reverse_kl_mc") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([r["step"] for r in rows], [r["loss/reverse_kl_mc"] for r in rows], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reverse KL(student || teacher) per token")
    ax.set_title("on the student's own prefixes (training batches)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "training_kl.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
