"""`prefix-distill plot RUN_DIR...`: eval accuracy and KL against cumulative training FLOPs, one line per run.

Reads each run's metrics.jsonl (its eval records carry flops/cum_total) and writes
    accuracy_vs_flops.png   eval/accuracy (runs whose task has answers)
    kl_vs_flops.png         eval/kl_head and eval/kl_tail side by side
into the output folder. Comparing methods at equal compute is the point: a prefix run's line should reach the
full run's accuracy further left.
"""

from __future__ import annotations

from pathlib import Path

from trainer.metrics import read_metrics


def eval_curve(run_dir: str | Path, key: str) -> tuple[list[float], list[float]]:
    """(cumulative FLOPs, value) of `key` at each evaluation of a run."""
    xs, ys = [], []
    for r in read_metrics(run_dir):
        if r.get(key) is not None and "flops/cum_total" in r:
            xs.append(float(r["flops/cum_total"]))
            ys.append(float(r[key]))
    return xs, ys


def _label(run_dir: Path, labels: dict[str, str] | None) -> str:
    return (labels or {}).get(str(run_dir), run_dir.resolve().name)


def plot_runs(
    run_dirs: list[str | Path], out_dir: str | Path, *, labels: dict[str, str] | None = None
) -> list[Path]:
    """Writes the PNGs for `run_dirs` into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in run_dirs]
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    any_acc = False
    for run in runs:
        xs, ys = eval_curve(run, "eval/accuracy")
        if xs:
            any_acc = True
            ax.plot(xs, ys, marker="o", label=_label(run, labels))
    if any_acc:
        ax.set_xlabel("cumulative training FLOPs (sampling + training + teacher)")
        ax.set_ylabel("held-out accuracy (exact match)")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / "accuracy_vs_flops.png"
        fig.savefig(path, dpi=120)
        written.append(path)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in (
        (axes[0], "eval/kl_head", "head (first positions)"),
        (axes[1], "eval/kl_tail", "tail"),
    ):
        for run in runs:
            xs, ys = eval_curve(run, key)
            if xs:
                ax.plot(xs, ys, marker="o", label=_label(run, labels))
        ax.set_title(f"reverse KL to the teacher, {title}")
        ax.set_xlabel("cumulative training FLOPs")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean per-token KL(student || teacher)")
    axes[0].legend()
    fig.tight_layout()
    path = out_dir / "kl_vs_flops.png"
    fig.savefig(path, dpi=120)
    written.append(path)
    plt.close(fig)
    return written
