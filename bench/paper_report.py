"""The paper table's report: tables (Markdown) and plots (PNG) from the benchmark's records. Pure of training.

`write_report(results, meta, out)` writes paper_table.md/.png, rescue.md/.png and kl_position.md/.png, and
returns the Markdown of the table. Every figure is a mean over seeds with its standard deviation; FLOP ratios
are to `full` of the same task ("4.9x" = 4.9 times fewer total FLOPs than full OPD).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from bench.paper_methods import METHODS, PREFIX_METHODS

WITHIN = 0.02
"""A prefix method 'matches' full OPD when its mean accuracy is within 2 points of full's."""


def _by_method(records: list[dict], task: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r["task"] == task:
            groups[r["method"]].append(r)
    return {m: groups[m] for m in METHODS if m in groups}


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean(groups: dict[str, list[dict]], method: str, key: str) -> float:
    """Mean over seeds of `key` for `method`."""
    return _mean_std([r[key] for r in groups[method]])[0]


def best_prefix_method(records, task: str) -> str:
    """The prefix method with the fewest FLOPs among those within 2 points of full, else the most accurate."""
    rows = [r if isinstance(r, dict) else r.__dict__ for r in records]
    groups = _by_method(rows, task)
    if not groups:
        return "full"
    full_acc = _mean_std([r["accuracy"] for r in groups.get("full", [])])[0]
    stats = {
        m: (_mean_std([r["accuracy"] for r in g])[0], _mean_std([r["flops_total"] for r in g])[0])
        for m, g in groups.items()
        if m in PREFIX_METHODS
    }
    if not stats:
        return "full"
    close = [m for m, (acc, _) in stats.items() if not math.isnan(full_acc) and acc >= full_acc - WITHIN]
    if close:
        return min(close, key=lambda m: stats[m][1])
    return max(stats, key=lambda m: stats[m][0])


def task_table(records: list[dict], task: str) -> str:
    groups = _by_method(records, task)
    full_flops = _mean_std([r["flops_total"] for r in groups.get("full", [])])[0]
    start = _mean_std([r["accuracy_start"] for g in groups.values() for r in g])[0]
    lines = [
        f"### builtin:{task} (student starts at {100 * start:.1f}%)",
        "",
        "| method | held-out accuracy % | KL head | KL tail | FLOPs total | sampling / teacher / training "
        "| fewer FLOPs than full | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, g in groups.items():
        acc, sd = _mean_std([100 * r["accuracy"] for r in g])
        head, tail = _mean_std([r["kl_head"] for r in g])[0], _mean_std([r["kl_tail"] for r in g])[0]
        tot = _mean_std([r["flops_total"] for r in g])[0]
        parts = [_mean_std([r[f"flops_{k}"] for r in g])[0] for k in ("sampling", "teacher", "training")]
        ratio = full_flops / tot if tot else float("nan")
        wall = _mean_std([r["wall_s"] for r in g])[0]
        lines.append(
            f"| {method} | {acc:.1f} ± {sd:.1f} | {head:.3f} | {tail:.3f} | {tot:.3g} | "
            f"{' / '.join(f'{p:.2g}' for p in parts)} | {ratio:.1f}x | {wall:.0f} |"
        )
    return "\n".join(lines)


def verdict(records: list[dict], task: str) -> str:
    """The plain statement the issue asks for: did a prefix method come within 2 points of full, at what saving."""
    groups = _by_method(records, task)
    if "full" not in groups:
        return f"builtin:{task}: no `full` run to compare with."
    full_acc, full_flops = _mean(groups, "full", "accuracy"), _mean(groups, "full", "flops_total")
    best = best_prefix_method(records, task)
    acc, saving = _mean(groups, best, "accuracy"), full_flops / _mean(groups, best, "flops_total")
    if acc >= full_acc - WITHIN:
        return (
            f"builtin:{task}: yes. `{best}` reached {100 * acc:.1f}% against full OPD's {100 * full_acc:.1f}% "
            f"with {saving:.1f}x fewer total FLOPs (the cheapest prefix method within 2 points)."
        )
    return (
        f"builtin:{task}: no. The best prefix method, `{best}`, reached {100 * acc:.1f}% against full OPD's "
        f"{100 * full_acc:.1f}% ({saving:.1f}x fewer total FLOPs)."
    )


def accuracy_at(curve: list[tuple[float, float]], flops: float) -> float | None:
    """Accuracy of one run's (cumulative FLOPs, accuracy) curve at `flops`, linear in log FLOPs between its
    evaluations; None past its last evaluation (the run never spent that much)."""
    points = [(math.log(x), y) for x, y in curve if x > 0]
    if not points or flops <= 0 or math.log(flops) > points[-1][0] + 1e-9:
        return None
    x = math.log(flops)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def equal_compute(records: list[dict], task: str) -> str:
    """OPD against supervised training on gold answers at sft-gold's whole budget: the issue's comparison."""
    groups = _by_method(records, task)
    if "sft-gold" not in groups:
        return f"builtin:{task}: no `sft-gold` run."
    gold_acc, budget = _mean(groups, "sft-gold", "accuracy"), _mean(groups, "sft-gold", "flops_total")
    parts = []
    for method in dict.fromkeys(["full", best_prefix_method(records, task)]):
        if method not in groups:
            continue
        at = [accuracy_at(r["curve"], budget) for r in groups[method]]
        if all(a is not None for a in at):
            parts.append(f"`{method}` had {100 * statistics.fmean(at):.1f}% at the same FLOPs")
        else:
            acc, spent = _mean(groups, method, "accuracy"), _mean(groups, method, "flops_total")
            parts.append(f"`{method}` ended at {100 * acc:.1f}% having spent {budget / spent:.1f}x less")
    return (
        f"builtin:{task}: `sft-gold` reached {100 * gold_acc:.1f}% with {budget:.3g} FLOPs; "
        + "; ".join(parts)
        + " (accuracy between evaluations interpolated in log FLOPs)."
    )


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(records: list[dict], tasks: list[str], path: Path) -> None:
    """Held-out accuracy against cumulative FLOPs, one curve per method, a band of +- one std over seeds."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for method, g in _by_method(records, task).items():
            curves = [r["curve"] for r in g if r["curve"]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            xs = [statistics.fmean(c[i][0] for c in curves) for i in range(n)]
            ms = [_mean_std([100 * c[i][1] for c in curves]) for i in range(n)]
            style = "-" if method in PREFIX_METHODS or method == "full" else "--"
            (line,) = ax.plot(xs, [m for m, _ in ms], style, marker=".", label=method)
            ax.fill_between(
                xs, [m - s for m, s in ms], [m + s for m, s in ms], alpha=0.15, color=line.get_color()
            )
        ax.set_xscale("log")
        ax.set_xlabel("cumulative training FLOPs (sampling + teacher + training)")
        ax.set_ylabel("held-out accuracy %")
        ax.set_title(f"builtin:{task}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rescue_report(results: list[dict], out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines = ["| task | " + " | ".join(f"L={L}" for L in results[0]["before"]["rescue"]) + " |"]
    lines.append("| --- |" + " --- |" * len(results[0]["before"]["rescue"]))
    for t in results:
        curve = {int(k): v for k, v in t["before"]["rescue"].items()}
        lines.append(
            f"| builtin:{t['task']} | " + " | ".join(f"{100 * v:.1f}" for v in curve.values()) + " |"
        )
        ax.plot(list(curve), [100 * v for v in curve.values()], marker="o", label=f"builtin:{t['task']}")
    ax.set_xscale("symlog", linthresh=2)
    _label(ax, "teacher-written prefix length L (tokens)", "student accuracy continuing it %",
           "teacher-prefix rescue (student before training)")  # fmt: skip
    intro = (
        "The student (before any distillation) continues a greedy teacher-written prefix of L tokens; held-out "
        "accuracy in %."
    )
    return _write(fig, lines, out, "rescue", "Teacher-prefix rescue", intro)


def kl_report(results: list[dict], out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(6.4 * len(results), 4.2), squeeze=False)
    lines = ["| task | model | share of KL in first 2 / 4 / 8 / 16 / 32 tokens | total KL per answer |"]
    lines.append("| --- | --- | --- | --- |")
    for ax, t in zip(axes[0], results, strict=True):
        for label, a in [("start", t["before"]), *t.get("after", {}).items()]:
            kl = a["kl_by_position"]
            means, counts = kl["mean_by_position"], kl["count_by_position"]
            reach = [i for i, c in enumerate(counts) if c > 0]
            ax.plot(reach, [means[i] for i in reach], label=label if label == "start" else f"after {label}")
            sums = [m * c for m, c in zip(means, counts, strict=True)]
            total = sum(sums)
            shares = " / ".join(
                f"{100 * sum(sums[:L]) / total:.0f}%" if total else "-" for L in (2, 4, 8, 16, 32)
            )
            n = max(counts) if counts else 1
            lines.append(f"| builtin:{t['task']} | {label} | {shares} | {total / max(1, n):.3f} |")
        ax.set_yscale("symlog", linthresh=1e-3)
        _label(ax, "answer position", "mean KL(student || teacher), nats", f"builtin:{t['task']}")
    intro = (
        "Exact per-token KL(student || teacher) over full rows on the student's own sampled answers "
        "(temperature 1), held-out prompts, before training and after `full` and the best prefix method."
    )
    return _write(
        fig, lines, out, "kl_position", "Where the signal sits: reverse KL by answer position", intro
    )


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def _write(fig, lines: list[str], out: Path, name: str, heading: str, intro: str) -> str:
    """Saves `fig` as out/NAME.png and the table `lines` as out/NAME.md; returns the table."""
    plt = _plt()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    plt.close(fig)
    table = "\n".join(lines)
    (out / f"{name}.md").write_text(
        f"# {heading}\n\n{intro} Produced by `bench/paper_table.py`.\n\n{table}\n\n![{name}]({name}.png)\n"
    )
    return table


def write_report(results: list[dict], meta: dict, out: Path) -> str:
    """Writes the report files under `out`; returns the Markdown of paper_table.md."""
    records = [r for t in results for r in t["records"]]
    tasks = [t["task"] for t in results]
    plot_accuracy(records, tasks, out / "paper_table.png")
    rescue = rescue_report(results, out)
    kl = kl_report(results, out)
    seeds = ", ".join(str(s) for s in meta["seeds"])
    body = [
        "# The paper's table on the testbed",
        "",
        f"Seeds {seeds}; held-out accuracy as mean ± std over seeds; {meta['wall_s'] / 60:.0f} minutes in all. "
        "Every run trains the same warmed-up student through the real teacher service (embedded Redis, "
        "`teacher serve`). Regenerate with `make bench-paper`"
        + (" (this is a `--quick` run)." if meta["quick"] else "."),
        "",
        "## Verdict",
        "",
        *[f"- {verdict(records, t)}" for t in tasks],
        "",
        "OPD against supervised training on the gold answers, at the compute that `sft-gold` used:",
        "",
        *[f"- {equal_compute(records, t)}" for t in tasks],
        "",
        "What the numbers mean, what makes a short prefix safe for these small students, and what else was "
        "tried: [prefix_opd.md](prefix_opd.md).",
        "",
        "## Results",
        "",
        *[task_table(records, t) + "\n" for t in tasks],
        "![accuracy against FLOPs](paper_table.png)",
        "",
        "## Teacher-prefix rescue (before training)",
        "",
        rescue,
        "",
        "## KL by position",
        "",
        kl,
        "",
        "Settings: `" + " ".join(meta["common"]) + "`.",
        "",
    ]
    text = "\n".join(body)
    (out / "paper_table.md").write_text(text)
    return text
