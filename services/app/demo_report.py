"""What the demo shows when its job is done: the before/after table, one answer that changed, the compute used.

Pure presentation over the run's summary (trainer.summary.RunSummary) and, when present, the benchmark's
records (docs/results/paper_table.json) for the comparison with full OPD.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "docs" / "results" / "paper_table.json"

CAVEAT = (
    "caveat: on this testbed a prompt-independent answer is valid (the untrained student with one token forced "
    "or banned scores 100%), so this accuracy does not show distillation; see docs/results/prefix_opd.md "
    "(correction)."
)
"""The demo's closing line until the rebuilt testbed replaces the pair (issue 25)."""

# What the results table shows, in order: (metric key, label, as a percentage?).
ROWS = (
    ("eval/accuracy", "held-out accuracy", True),
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
    """The benchmark's full-OPD figures for this task, per step (None without a benchmark record)."""
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
            "timings_s",
        )
        body = {k: getattr(self, k) for k in keys}
        body["plots"] = [p.name for p in self.plots]
        return json.dumps(body, indent=2) + "\n"


def pick_sample(before: list[dict], after: list[dict]) -> tuple[dict | None, dict | None]:
    """The same held-out prompt before and after: one answered wrongly before and correctly after, if any."""
    pairs = [(b, a) for b, a in zip(before, after, strict=False) if b["prompt"] == a["prompt"]]
    for b, a in pairs:
        if b.get("correct") is False and a.get("correct") is True:
            return b, a
    if pairs:
        return pairs[0]
    return (before[0] if before else None), (after[0] if after else None)


def full_opd_reference(task: str, path: Path = BENCHMARK) -> dict | None:
    """Mean held-out accuracy and FLOPs per step of the benchmark's `full` runs on `task`, if recorded."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    runs = [r for r in data.get("records", []) if r["task"] == task and r["method"] == "full"]
    steps = dict(s.split("=", 1) for s in data.get("meta", {}).get("common", [])).get("steps")
    if not runs or not steps or data["meta"].get("quick"):
        return None
    n = len(runs)
    return {
        "accuracy": sum(r["accuracy"] for r in runs) / n,
        "flops_per_step": sum(r["flops_total"] for r in runs) / n / int(steps),
        "steps": int(steps),
        "seeds": n,
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
        f"{k.removeprefix('flops/cum_')} {v:.3g}" for k, v in result.flops.items() if not k.endswith("total")
    )
    console.print(f"training compute: {total:.3g} FLOPs ({parts})", highlight=False)
    ref = result.full_opd
    if ref:
        full = ref["flops_per_step"] * steps
        console.print(
            f"full OPD for the same {steps} steps: ~{full:.3g} FLOPs, {full / total:.1f}x more "
            f"(the benchmark's full runs: {100 * ref['accuracy']:.1f}% after {ref['steps']} steps, "
            f"{ref['seeds']} seeds; docs/results/paper_table.md)",
            highlight=False,
        )
    console.print(CAVEAT, highlight=False)


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
