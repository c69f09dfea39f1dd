"""What makes prefix OPD safe for a small student: a sweep of prefix lengths x safeguards, with seeds and FLOPs.

On a short prefix, plain prefix OPD teaches the student its first tokens and wrecks the rest of its answer
(the paper's caveat about small students, in its sharpest form). This sweep measures, on both testbed tasks,
every safeguard the trainer offers, alone and at several strengths, each run with its FLOPs so that a
safeguard that costs what it saves shows as such:

    plain            prefix OPD as is
    head             freeze the embeddings and decoder layers (train the final norm and output layer)
    layer1           freeze the embeddings and the first decoder layer only
    l2-<c>           anchor.l2 = c / L: an L2 pull toward the starting weights, scaled by the prefix length
                     (with the loss averaged per trained token, the pull must shrink as L grows; l2-80 at L = 8
                     is the weight that works at L = 2, unscaled)
    tail-ref         1/8 of each batch's rollouts run to full length; their tail is held to the starting
                     student by a KL term (teacher scores only the prefix)
    tail-teacher     the same rollouts scored and trained on every position by the teacher
    linear           a prefix growing from 4 to 120 tokens (full OPD's length) over the run

Accuracy is measured on the validation split (`eval.split=validation`: 150 training prompts left out of
training), never on the held-out split that the paper table reports. Runs use the in-process teacher (`teacher: inprocess:PATH`, the same engine the service runs, without the
queue) to keep the sweep short; the paper table (bench/paper_table.py) runs its methods through the service.

    .venv/bin/python bench/prefix_safety.py                  # ~40 minutes on 2 cores
    .venv/bin/python bench/prefix_safety.py --quick --out /tmp/safety
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.paper_methods import FREEZE_TRUNK, prefix  # noqa: E402
from bench.paper_table import train_one  # noqa: E402

LENGTHS = (2, 8, 16)
VALIDATION = ["eval.split=validation", "eval.prompts=150", "eval.every=0"]
"""Every variant is measured on the validation split (150 training prompts left out of training), never on the
held-out split: the paper table's held-out figures stay untouched by the choice of safeguard."""


def variants() -> dict[str, list[str]]:
    """Variant name -> config overrides (on top of the paper table's COMMON settings)."""
    out: dict[str, list[str]] = {"full": ["prefix.schedule=full"], "linear-4-120": [
        "prefix.schedule=linear", "prefix.start=4", "prefix.end=120"]}  # fmt: skip
    for L in LENGTHS:
        out[f"L{L} plain"] = prefix(L)
        out[f"L{L} head"] = prefix(L, FREEZE_TRUNK)
        out[f"L{L} l2-20"] = prefix(L, f"anchor.l2={20 / L:g}")
    out["L8 layer1"] = prefix(8, "freeze=[model.embed_tokens,model.layers.0]")
    out["L8 l2-80"] = prefix(8, "anchor.l2=10")  # the L2 run's weight (20 / 2) at L = 8
    out["L8 tail-ref"] = prefix(8, "anchor.tail_fraction=0.125", "anchor.tail_target=reference")
    out["L8 tail-teacher"] = prefix(8, "anchor.tail_fraction=0.125", "anchor.tail_target=teacher")
    return {name: [*overrides, *VALIDATION] for name, overrides in out.items()}


def report(records: list[dict], tasks: list[str], out: Path, meta: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.8), squeeze=False)
    lines = [
        "# What makes prefix OPD safe: prefix length x safeguard",
        "",
        f"Seeds {', '.join(map(str, meta['seeds']))}; validation accuracy % (150 training prompts left out of training) as mean ± std; FLOPs relative to `full`. "
        "Produced by `bench/prefix_safety.py` (in-process teacher).",
        "",
    ]
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = [r for r in records if r["task"] == task]
        names = list(dict.fromkeys(r["method"] for r in rows))
        full = statistics.fmean(r["flops_total"] for r in rows if r["method"] == "full")
        lines += [
            f"## builtin:{task}",
            "",
            "| variant | accuracy % | fewer FLOPs than full |",
            "| --- | --- | --- |",
        ]
        for name in names:
            g = [r for r in rows if r["method"] == name]
            accs = [100 * r["accuracy"] for r in g]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            flops = statistics.fmean(r["flops_total"] for r in g)
            lines.append(f"| {name} | {statistics.fmean(accs):.1f} ± {sd:.1f} | {full / flops:.1f}x |")
            ax.errorbar(full / flops, statistics.fmean(accs), yerr=sd, fmt="o", capsize=3)
            ax.annotate(
                name,
                (full / flops, statistics.fmean(accs)),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
        lines.append("")
        ax.set_xscale("log")
        ax.set_xlabel("FLOP saving against full OPD (x fewer)")
        ax.set_ylabel("validation accuracy %")
        ax.set_title(f"builtin:{task}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "prefix_safety.png", dpi=120)
    plt.close(fig)
    lines.append("![accuracy against FLOP saving](prefix_safety.png)")
    text = "\n".join(lines) + "\n"
    (out / "prefix_safety.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="One seed, 3 steps: the pipeline only.")
    parser.add_argument("--tasks", default="plan,chain")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", default="", help="Comma-separated variant names (default: all).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()

    import torch

    from services.models.testbed import prepare_pair
    from services.util.progress import quiet_progress_bars

    quiet_progress_bars()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else list(range(args.seeds))
    chosen = variants()
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",") or k == "full"}
    records, t0 = [], time.perf_counter()
    tasks = args.tasks.split(",")
    with tempfile.TemporaryDirectory(prefix="safety-") as tmp:
        for task in tasks:
            pair = prepare_pair(task)
            for name, overrides in chosen.items():
                for seed in seeds:
                    rec, _ = train_one(
                        task, name, overrides, seed, pair, f"inprocess:{pair.teacher}", Path(tmp), args.quick
                    )
                    records.append(asdict(rec))
                    print(
                        f"[{task}] {name:>16} seed {seed}: {rec.accuracy:.3f} ({rec.flops_total:.3g} FLOPs)",
                        flush=True,
                    )
    meta = {"seeds": seeds, "quick": args.quick, "wall_s": round(time.perf_counter() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_safety.json").write_text(
        json.dumps({"meta": meta, "records": records}, indent=1) + "\n"
    )
    print(report(records, tasks, args.out, meta))


if __name__ == "__main__":
    main()
