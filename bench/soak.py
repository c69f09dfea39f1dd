"""Soak: N student jobs against one teacher for M minutes; fairness, latency, and whether memory grows.

    python bench/soak.py --jobs 4 --minutes 10      # writes bench/results/soak.{md,json} and docs/results/soak.png

The teacher is a fresh stack (its own Redis, a front-end, two workers, a tiny local model). Each job sends one
request at a time on two concurrent streams of unary calls, so every request has its own latency. Every
`--sample-s` seconds the soak records each job's answers, Redis' used memory and the RSS of every teacher
process (Redis, front-end, workers). It reports per-job throughput (and min/max across jobs: fairness), p50 and
p99 latency, and memory over time; it fails (exit 1) when a process's RSS or Redis' memory grows between the
second quarter of the run (after warm-up) and the last quarter by more than the allowed slack.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultlib import Stack, tiny_models  # noqa: E402
from loadgen import Load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RSS_SLACK = (0.10, 16 * 2**20)  # a process may grow by 10% plus 16 MiB (allocator noise) and still pass
REDIS_SLACK = 1 * 2**20


def processes(stack: Stack) -> dict[str, psutil.Process]:
    procs = {"redis": psutil.Process(stack.redis.proc.pid), "frontend": psutil.Process(stack.front.pid)}
    for i, w in enumerate(stack.workers):
        procs[f"worker-{i}"] = psutil.Process(w.pid)
    return procs


def sampler(stack: Stack, load: Load, every_s: float, stop: threading.Event, rows: list[dict]) -> None:
    procs, redis = processes(stack), stack.redis.client()
    t0 = time.monotonic()
    while not stop.wait(every_s):
        row = {"t": round(time.monotonic() - t0, 2), "redis_used_memory": redis.info("memory")["used_memory"]}
        row.update({f"rss/{name}": p.memory_info().rss for name, p in procs.items()})
        row.update({f"answered/{t.job}": t.answered for t in load.tallies})
        rows.append(row)


def growth(rows: list[dict], key: str) -> tuple[float, float]:
    """(mean over the second quarter, mean over the last quarter) of a column."""
    n = len(rows)
    second = [r[key] for r in rows[n // 4 : n // 2]] or [rows[0][key]]
    last = [r[key] for r in rows[3 * n // 4 :]] or [rows[-1][key]]
    return float(np.mean(second)), float(np.mean(last))


def summarize(load: Load, rows: list[dict], seconds: float) -> dict:
    lat = np.array([x for t in load.tallies for x in t.latencies]) * 1000
    per_job = {t.job: t.answered / seconds for t in load.tallies}
    memory = {}
    for key in [k for k in rows[0] if k.startswith(("rss/", "redis_used"))]:
        before, after = growth(rows, key)
        slack = REDIS_SLACK if key == "redis_used_memory" else before * RSS_SLACK[0] + RSS_SLACK[1]
        memory[key] = {
            "second_quarter_mb": before / 2**20,
            "last_quarter_mb": after / 2**20,
            "grows": after - before > slack,
        }
    errors = sum(sum(t.errors.values()) for t in load.tallies)
    return {
        "seconds": round(seconds, 1),
        "jobs": len(load.tallies),
        "requests": int(lat.size),
        "errors": errors,
        "per_job_rps": per_job,
        "fairness_min_over_max": min(per_job.values()) / max(per_job.values()),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "memory": memory,
    }


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([r["t"] for r in rows]) / 60
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for key in [k for k in rows[0] if k.startswith("answered/")]:
        counts = np.array([r[key] for r in rows], dtype=float)
        rate = np.diff(counts, prepend=0) / np.diff(np.concatenate([[0], t * 60]))
        axes[0].plot(t, rate, label=key.split("/", 1)[1])
    axes[0].set_ylabel("requests/s per job")
    axes[0].legend(fontsize=7, ncol=4)
    axes[1].plot(t, [r["redis_used_memory"] / 2**20 for r in rows])
    axes[1].set_ylabel("Redis used_memory (MiB)")
    for key in [k for k in rows[0] if k.startswith("rss/")]:
        axes[2].plot(t, [r[key] / 2**20 for r in rows], label=key[4:])
    axes[2].set_ylabel("RSS (MiB)")
    axes[2].set_xlabel("minutes")
    axes[2].legend(fontsize=7)
    fig.suptitle("prefix-distill teacher soak: throughput per job, Redis memory, process RSS")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def markdown(s: dict) -> str:
    lines = [
        f"{s['jobs']} jobs for {s['seconds'] / 60:.1f} min: {s['requests']} requests, {s['errors']} errors; "
        f"latency p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms; fairness (slowest / fastest job) "
        f"{s['fairness_min_over_max']:.3f}.",
        "",
        "| job | requests/s |",
        "|---|---|",
        *[f"| {job} | {rps:.1f} |" for job, rps in s["per_job_rps"].items()],
        "",
        "| memory | 2nd quarter (MiB) | last quarter (MiB) | grows |",
        "|---|---|---|---|",
        *[
            f"| {k} | {m['second_quarter_mb']:.1f} | {m['last_quarter_mb']:.1f} | {'yes' if m['grows'] else 'no'} |"
            for k, m in s["memory"].items()
        ],
    ]
    return "\n".join(lines) + "\n"


def run(jobs: int, minutes: float, sample_s: float, folder: Path) -> tuple[dict, list[dict]]:
    teacher, _ = tiny_models(folder / "models")
    stack = Stack(teacher, folder / "stack", flags={"max-batch-size": "32"}).start()
    rows: list[dict] = []
    stop = threading.Event()
    try:
        load = Load(stack.target, jobs, chunk=0, streams=2, prefix="soak", keep_answers=False).start()
        t0 = time.monotonic()
        watcher = threading.Thread(target=sampler, args=(stack, load, sample_s, stop, rows), daemon=True)
        watcher.start()
        time.sleep(minutes * 60)
        stop.set()
        watcher.join()
        load.stop()
        seconds = time.monotonic() - t0
    finally:
        stack.stop()
    return summarize(load, rows, seconds), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "results" / "soak.png")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pd-soak-") as tmp:
        summary, rows = run(args.jobs, args.minutes, args.sample_s, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"summary": summary, "samples": rows}, indent=1) + "\n"
    )
    args.out.with_suffix(".md").write_text(markdown(summary))
    plot(rows, args.png)
    print(markdown(summary))
    grew = [k for k, m in summary["memory"].items() if m["grows"]]
    if grew or summary["errors"]:
        print(f"FAIL: memory grows for {grew}; {summary['errors']} errors", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
