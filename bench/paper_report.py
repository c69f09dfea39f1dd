"""The paper table's report: tables (Markdown) and plots (PNG) from the benchmark's records. Pure of training.

`write_report(data, out)` writes paper_table.md/.png, rescue.md/.png and kl_position.md/.png, and returns the
Markdown of paper_table.md. Every figure is a mean over seeds ± its standard deviation. The headline measure
of compute is **compute to reach**: the cumulative FLOPs (sampling + teacher + training, one ledger for every
method) at a run's first evaluation within 2 points of `full`'s final mean accuracy (or agreement), reported
as a ratio to `full`'s own compute to reach that target; equal-step totals are a second column. What the
teacher's prompt cache saved is its own column and never enters a ratio.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from bench.paper_methods import METHODS, PREFIX_METHODS
from trainer.reach import WITHIN, mean_std, reach, reach_stats, reaches, targets
from trainer.reach import by_method as _by_method
from trainer.reach import final as _final

__all__ = ["by_method", "reach", "reach_stats", "targets", "write_report"]

SHORTCUTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "shortcuts.json"
SWEEP = Path(__file__).resolve().parents[1] / "bench" / "paper_lr.json"


def by_method(records: list[dict], task: str) -> dict[str, list[dict]]:
    return _by_method(records, task, METHODS)


def _pm(values, scale: float = 100.0) -> str:
    m, s = mean_std([scale * v for v in values])
    return "-" if math.isnan(m) else f"{m:.1f} ± {s:.1f}"


def _saving(full_flops: float, flops: float) -> str:
    """'3.1x less compute', or what it means when a run met the target at its start (0 FLOPs)."""
    if flops <= 0:
        return "no compute (the target was met before training)"
    return f"{full_flops / flops:.1f}x less compute"


def _reach_cell(runs, key, target, full_mean) -> str:
    m, s, n = reach_stats(runs, key, target)
    if n == 0:
        return f"not reached (0/{len(runs)})"
    ratio = full_mean / m if full_mean and not math.isnan(full_mean) else float("nan")
    seeds = "" if n == len(runs) else f" ({n}/{len(runs)})"
    return f"{m:.2g} ± {s:.1g}, **{ratio:.1f}x**{seeds}"


def method_rows(groups, tg) -> list[str]:
    full_acc = reach_stats(groups.get("full", []), "accuracy", tg["accuracy"])[0]
    full_agr = reach_stats(groups.get("full", []), "agreement", tg["agreement"])[0]
    full_total = mean_std([r["flops"]["total"] for r in groups.get("full", [])])[0]
    rows = []
    for method, runs in groups.items():
        total = mean_std([r["flops"]["total"] for r in runs])[0]
        saved = mean_std([r["flops"]["teacher_saved"] for r in runs])[0]
        secs = {
            k: mean_std([r["seconds"][k] for r in runs])[0]
            for k in ("sampling", "teacher", "training", "wall")
        }
        rows.append(
            f"| {method} | {runs[0]['lr']:g} | {_pm([r['accuracy'] for r in runs])} | "
            f"{_pm([r['agreement'] for r in runs])} | {_pm([r['execution'] for r in runs])} | "
            f"{_reach_cell(runs, 'accuracy', tg['accuracy'], full_acc)} | "
            f"{_reach_cell(runs, 'agreement', tg['agreement'], full_agr)} | "
            f"{total:.3g} ({full_total / total:.1f}x) | {saved:.2g} | "
            f"{secs['sampling']:.0f} / {secs['teacher']:.0f} / {secs['training']:.0f} / {secs['wall']:.0f} |"
        )
    return rows


def baseline_rows(task: str, path: Path = SHORTCUTS) -> list[str]:
    """The untrained baselines of bench/shortcuts.py on the held-out split, as rows of the same table."""
    if not path.exists():
        return []
    r = json.loads(path.read_text())["tasks"].get(task, {}).get("heldout")
    if not r:
        return []
    ff = max(r["forced_first"], key=r["forced_first"].get)
    bb = max(r["banned"], key=r["banned"].get)

    def row(name, acc):
        return f"| *{name}* | - | {100 * acc:.1f} | - | - | no training | - | 0 | - | - |"

    return [
        row("untrained student", r["student"]),
        row(f"forced first tag, best (`{ff}`)", r["forced_first"][ff]),
        row(f"banned token, best (`{bb}`)", r["banned"][bb]),
        row(f"constant tags, best (`{r['best_constant']['tags']}`)", r["best_constant"]["accuracy"]),
        row("untrained student told the teacher's decisions", r.get("told_the_decision", float("nan"))),
        row("teacher", r["teacher"]),
    ]


def task_table(records: list[dict], task: str) -> str:
    groups = by_method(records, task)
    tg = targets(groups)
    start = {
        k: mean_std([r["start"][k] for g in groups.values() for r in g])[0]
        for k in ("accuracy", "agreement", "execution")
    }
    head = (
        f"### builtin:{task}\n\nThe student starts at {100 * start['accuracy']:.1f}% accuracy, "
        f"{100 * start['agreement']:.1f}% agreement and {100 * start['execution']:.1f}% execution. Targets: "
        f"accuracy {100 * tg['accuracy']:.1f}%, agreement {100 * tg['agreement']:.1f}% (full's final mean - 2 "
        "points).\n\n"
        "| method | lr | accuracy % | agreement % | execution % | FLOPs to reach the accuracy target (x fewer "
        "than full) | FLOPs to reach the agreement target | FLOPs at the last step (x fewer) | teacher cache "
        "saved (FLOPs, apart) | seconds: sampling / teacher / training / wall |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    return "\n".join([head, *method_rows(groups, tg), *baseline_rows(task)])


def best_prefix(groups, key: str, target: float) -> tuple[str, float] | None:
    """The prefix method with the least compute to reach `target` on `key` (every seed reaching it, and the
    final mean still at or above it: touching the target once on the way down is not reaching it), if any."""
    best = None
    for m in PREFIX_METHODS:
        if m in groups and reaches(groups[m], key, target):
            mean = reach_stats(groups[m], key, target)[0]
            if best is None or mean < best[1]:
                best = (m, mean)
    return best


def verdict(records: list[dict], task: str) -> list[str]:
    """The plain statements the issue asks for, computed from the records."""
    groups = by_method(records, task)
    if "full" not in groups:
        return [f"builtin:{task}: no `full` run to compare with."]
    tg = targets(groups)
    out = []
    for key in ("accuracy", "agreement"):
        full_reach = reach_stats(groups["full"], key, tg[key])[0]
        best = best_prefix(groups, key, tg[key])
        final = {m: _final(groups[m], key) for m in groups if m in PREFIX_METHODS}
        if best is None:
            top = max(final, key=final.get) if final else "-"
            out.append(
                f"builtin:{task}, {key}: **no** prefix method came within 2 points of full "
                f"({100 * (tg[key] + WITHIN):.1f}%) on every seed; the best, `{top}`, ended at "
                f"{100 * final.get(top, float('nan')):.1f}%."
            )
        else:
            m, flops = best
            out.append(
                f"builtin:{task}, {key}: **yes**, `{m}` came within 2 points of full on every seed, with "
                f"{_saving(full_reach, flops)} to reach the target than full (and ended at "
                f"{100 * final[m]:.1f}% against full's {100 * (tg[key] + WITHIN):.1f}%)."
            )
    return out + safety(groups, tg, task) + [line for m in WHY if (line := moved(groups, m, task))]


WHY = ("readout-L8", "lora-L8", "lora-full", "sft-gold", "seqkd")
"""The rows that say why: a bias of the output layer, a restricted update, no teacher at all, the teacher's
own answers off-policy (SeqKD)."""


def safety(groups, tg, task: str) -> list[str]:
    """Which prefix methods reached full's agreement while keeping execution within 2 points of full's."""
    full_exe = _final(groups["full"], "execution")
    reached = [m for m in PREFIX_METHODS if m in groups and reaches(groups[m], "agreement", tg["agreement"])]
    if not reached:
        return []
    safe = [m for m in reached if _final(groups[m], "execution") >= full_exe - WITHIN]
    broken = [f"`{m}` {100 * _final(groups[m], 'execution'):.1f}%" for m in reached if m not in safe]
    line = (
        f"builtin:{task}, safety: of the prefix methods that reached full's agreement, "
        + (
            f"{', '.join(f'`{m}`' for m in safe)} kept execution within 2 points of full's "
            if safe
            else "none kept execution within 2 points of full's "
        )
        + f"{100 * full_exe:.1f}%"
        + (f"; execution fell to {', '.join(broken)}" if broken else "")
        + "."
    )
    return [line]


def moved(groups, method: str, task: str) -> str | None:
    """'`method` moved agreement from S to E (full: F), accuracy ..., execution ...' when it was run."""
    if method not in groups:
        return None
    runs, full = groups[method], groups["full"]
    start = mean_std([r["start"]["agreement"] for r in runs])[0]
    parts = ", ".join(
        f"{key} {100 * _final(runs, key):.1f}% (full {100 * _final(full, key):.1f}%)"
        for key in ("accuracy", "execution")
    )
    return (
        f"builtin:{task}, `{method}`: agreement {100 * start:.1f}% -> {100 * _final(runs, 'agreement'):.1f}% "
        f"(full {100 * _final(full, 'agreement'):.1f}%), {parts}."
    )


def split_rows(records: list[dict], task: str, sweep: dict) -> list[str]:
    """Seed 0 at the chosen rate trains the same student in the sweep and in the table (same prompts, seed and
    rate; evaluation is greedy and draws nothing): its validation figures (the sweep) beside its held-out ones
    (the table) separate what the split changes from what the seed changes."""
    lines = ["| method | rate | validation agr / acc / exec | held-out agr / acc / exec | "
             "held-out, all seeds (agr) |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    chosen = sweep.get("tasks", {}).get(task, {})
    for method, runs in by_method(records, task).items():
        zero = next((r for r in runs if r["seed"] == 0), None)
        trial = next(
            (t for t in chosen.get(method, {}).get("trials", []) if zero and t["lr"] == zero["lr"]), None
        )
        if zero is None or trial is None:
            continue

        def cells(r):
            return " / ".join(f"{100 * r[k]:.1f}" for k in ("agreement", "accuracy", "execution"))

        lines.append(f"| {method} | {zero['lr']:g} | {cells(trial)} | {cells(zero)} | "
                     f"{_pm([r['agreement'] for r in runs])} |")  # fmt: skip
    return lines if len(lines) > 2 else []


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[dict], tasks: list[str], path: Path) -> None:
    """Accuracy and agreement against cumulative FLOPs, one curve per method, a band of ± one std over seeds."""
    plt = _plt()
    fig, axes = plt.subplots(2, len(tasks), figsize=(7.0 * len(tasks), 9.0), squeeze=False)
    for col, task in enumerate(tasks):
        for row, key in enumerate(("accuracy", "agreement")):
            ax = axes[row][col]
            for method, runs in by_method(records, task).items():
                n = min(len(r["curve"]) for r in runs)
                if n == 0:
                    continue
                xs = [statistics.fmean(r["curve"][i]["flops"] for r in runs) for i in range(n)]
                ms = [mean_std([100 * r["curve"][i][key] for r in runs]) for i in range(n)]
                style = "-" if method in PREFIX_METHODS or method == "full" else "--"
                (line,) = ax.plot([max(x, 1e8) for x in xs], [m for m, _ in ms], style, label=method, lw=1.2)
                ax.fill_between([max(x, 1e8) for x in xs], [m - s for m, s in ms], [m + s for m, s in ms],
                                alpha=0.12, color=line.get_color())  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel("cumulative FLOPs (sampling + teacher + training)")
            ax.set_ylabel(f"held-out {key} %")
            ax.set_title(f"builtin:{task}: {key}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rescue_report(analyses: dict, out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lengths = list(next(iter(analyses.values()))["rescue"])
    lines = ["| task | " + " | ".join(f"L={L}" for L in lengths) + " |", "| --- |" + " --- |" * len(lengths)]
    for task, a in analyses.items():
        curve = {int(k): v for k, v in a["rescue"].items()}
        lines.append(f"| builtin:{task} | " + " | ".join(f"{100 * v:.1f}" for v in curve.values()) + " |")
        ax.plot(list(curve), [100 * v for v in curve.values()], marker="o", label=f"builtin:{task}")
    ax.set_xscale("symlog", linthresh=2)
    _label(ax, "teacher-written prefix length L (tokens)", "student accuracy continuing it %",
           "teacher-prefix rescue (student before training)")  # fmt: skip
    intro = "The student (before any distillation) continues a greedy teacher-written prefix of L tokens; held-out accuracy in %."
    return _write(fig, lines, out, "rescue", "Teacher-prefix rescue", intro)


def kl_report(analyses: dict, out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, len(analyses), figsize=(6.4 * len(analyses), 4.2), squeeze=False)
    lines = [
        "| task | share of KL in first 2 / 8 / 32 / 64 tokens | total KL per answer |",
        "| --- | --- | --- |",
    ]
    for ax, (task, a) in zip(axes[0], analyses.items(), strict=True):
        kl = a["kl_by_position"]
        means, counts = kl["mean_by_position"], kl["count_by_position"]
        reached = [i for i, c in enumerate(counts) if c > 0]
        ax.plot(reached, [means[i] for i in reached], label="start")
        sums = [m * c for m, c in zip(means, counts, strict=True)]
        total = sum(sums)
        shares = " / ".join(f"{100 * sum(sums[:L]) / total:.0f}%" if total else "-" for L in (2, 8, 32, 64))
        lines.append(f"| builtin:{task} | {shares} | {total / max(1, max(counts)):.3f} |")
        ax.set_yscale("symlog", linthresh=1e-3)
        _label(ax, "answer position", "mean KL(student || teacher), nats", f"builtin:{task}")
    intro = (
        "Exact per-token KL(student || teacher) over full rows on the student's own sampled answers (temperature "
        "1), held-out prompts, before training."
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


def split_section(records: list[dict], tasks: list[str], path: Path = SWEEP) -> list[str]:
    """'The same training on both splits', one table per task, when the sweep's records are there."""
    if not path.exists():
        return []
    sweep = json.loads(path.read_text())
    tables = [(t, split_rows(records, t, sweep)) for t in tasks]
    if not any(rows for _, rows in tables):
        return []
    out = ["## The same training on both splits (seed 0)", "",
           "The sweep's seed-0 run at the chosen rate and the table's seed-0 run train the same student from the "
           "same prompts, seed and rate (not bit for bit: the FLOP totals agree to 0.1%); only the evaluation prompts differ: 20 (first digit, second digit) pairs "
           "each, none seen in training. The gap between the two columns is the split; the last column is the "
           "seeds.", ""]  # fmt: skip
    for t, rows in tables:
        if rows:
            out += [f"builtin:{t}", "", *rows, ""]
    return out


def write_report(data: dict, out: Path) -> str:
    """Writes the report files under `out`; returns the Markdown of paper_table.md."""
    meta, records = data["meta"], data["records"]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    plot_curves(records, tasks, out / "paper_table.png")
    extra = []
    if data.get("analyses"):
        extra = ["## Teacher-prefix rescue (before training)", "", rescue_report(data["analyses"], out), "",
                 "## KL by position (before training)", "", kl_report(data["analyses"], out), ""]  # fmt: skip
    by_task = meta.get("seeds_by_task")
    seeds = (
        "; ".join(f"{t}: {', '.join(map(str, s))}" for t, s in by_task.items())
        if by_task
        else ", ".join(str(s) for s in meta["seeds"])
    )
    body = [
        "# The paper's table on the testbed",
        "",
        f"Seeds {seeds}; held-out figures as mean ± std over seeds; {meta['wall_s'] / 60:.0f} minutes on "
        f"{meta.get('cpu', 'this machine')} ({meta.get('date', '')}). Every run trains the same warmed-up student "
        "through the real teacher service at the learning rate chosen on the validation split "
        "(bench/paper_lr.json). Regenerate with `make bench-paper`"
        + (" (this is a `--quick` run)." if meta["quick"] else "."),
        "",
        "## Verdict (computed from the records)",
        "",
        *[f"- {line}" for t in tasks for line in verdict(records, t)],
        "",
        "What the numbers mean: [prefix_opd.md](prefix_opd.md). Rows in *italics* are untrained baselines "
        "(docs/results/shortcuts.json).",
        "",
        "## Results",
        "",
        *[task_table(records, t) + "\n" for t in tasks],
        "![accuracy and agreement against FLOPs](paper_table.png)",
        "",
        *extra,
        *split_section(records, tasks),
        "Settings: `" + " ".join(meta["common"]) + "`.",
        "",
    ]
    text = "\n".join(body)
    (out / "paper_table.md").write_text(text)
    return text
