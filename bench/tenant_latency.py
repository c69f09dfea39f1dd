"""Tenant latency: what one tenant's number of job ids does to another tenant's latency (issue 27, section 2).

    python bench/tenant_latency.py      # ~2-3 min; writes docs/results/tenant_latency.{md,json,png}

One real `teacher serve` (the tiny local teacher of bench/faultlib.py, one worker, its own Redis, two tokens:
team A and team B). Tenant B sends steady single requests (one at a time, a short pause between them) and
records each one's latency, in three settings: B alone; A flooding on one job id; A flooding on 200 job ids.
A's flood is the same in both: `--flood` requests always in flight (a separate process, unary calls), on one
job id or spread over 200. Batching is fair first across tenants (tokens), then across a tenant's jobs
(queue_scripts.py), so the target is that A's job count does not change B's p50/p99 beyond noise. The noise
is shown as the p50/p99 of each half of B's samples in a setting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from faultlib import tiny_models  # noqa: E402
from shortcuts import cpu_name  # noqa: E402

from services.teacher.client import TeacherClient  # noqa: E402
from services.teacher.launch import TeacherProcess  # noqa: E402
from services.teacher.redis_server import RedisProcess  # noqa: E402
from services.teacher.types import ScoreRequest  # noqa: E402

TOKEN_A = "bench-tenant-a-5b0f3c7e9d214a6c8e1f0a2b3c4d5e6f"
TOKEN_B = "bench-tenant-b-9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
SETTINGS = (("B alone", 0), ("A on 1 job", 1), ("A on 200 jobs", 200))
"""(name, A's job ids; 0: A sends nothing)."""
ISSUE_BEFORE_MS = {"B alone": (14, 85), "A on 1 job": (193, 1881), "A on 200 jobs": (1433, 7795)}
"""B's p50/p99 the issue measured before batching was fair across tenants (another machine and load)."""


def request(rng: np.random.Generator, job: str) -> ScoreRequest:
    """A distillation-sized request of the tiny models: 24 prompt tokens, 16 scored, top-8."""
    ids = rng.integers(5, 500, size=40)
    return ScoreRequest(prompt_token_ids=ids[:24], completion_token_ids=ids[24:], job_id=job, top_k=8)


def flood(target: str, jobs: int, in_flight: int, ready, stop, out) -> None:
    """Tenant A (a child process): `in_flight` unary calls always outstanding over `jobs` job ids, until `stop`."""

    async def go() -> tuple[int, int]:
        answered, failed = 0, 0
        async with TeacherClient(target, token=TOKEN_A, max_in_flight=in_flight) as client:

            async def loop(i: int) -> None:
                nonlocal answered, failed
                rng = np.random.default_rng(1000 + i)
                while not stop.is_set():
                    try:
                        await client.score(request(rng, f"team-a/j{i % jobs}"))
                        answered += 1
                    except Exception:  # counted, the flood goes on
                        failed += 1
                    if answered >= in_flight:
                        ready.set()

            await asyncio.gather(*(loop(i) for i in range(in_flight)))
        return answered, failed

    out.put(asyncio.run(go()))


async def tenant_b(target: str, seconds: float, pause_s: float) -> tuple[list[float], int]:
    """B's steady single requests for `seconds`: (latencies in ms, failures)."""
    rng, lat, failed = np.random.default_rng(7), [], 0
    async with TeacherClient(target, token=TOKEN_B) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                await client.score(request(rng, "team-b/steady"))
                lat.append((time.perf_counter() - t0) * 1000)
            except Exception:
                failed += 1
            await asyncio.sleep(pause_s)
    return lat, failed


def percentiles(lat: list[float]) -> dict:
    a = np.asarray(lat)
    halves = [a[: a.size // 2], a[a.size // 2 :]]
    return {
        "n": int(a.size),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "halves_p50_ms": [float(np.percentile(h, 50)) for h in halves],
        "halves_p99_ms": [float(np.percentile(h, 99)) for h in halves],
    }


def run_setting(target: str, jobs: int, args) -> dict:
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    child = None
    if jobs:
        child = ctx.Process(target=flood, args=(target, jobs, args.flood, ready, stop, out))
        child.start()
        if not ready.wait(120):
            raise TimeoutError("A's flood got no answers within 120 s")
        time.sleep(args.warmup_s)  # A's queue is full before B's first request
    t0 = time.monotonic()
    lat, failed = asyncio.run(tenant_b(target, args.seconds, args.pause_s))
    elapsed = time.monotonic() - t0
    row = {"a_jobs": jobs, "b_failed": failed, **percentiles(lat)}
    if child is not None:
        stop.set()
        a_answered, a_failed = out.get(timeout=180)
        child.join(60)
        row |= {
            "a_answered": a_answered,
            "a_failed": a_failed,
            "a_rps": a_answered / (elapsed + args.warmup_s),
        }
    return row


def markdown(res: dict) -> str:
    lines = [
        "# Tenant latency: B's latency against A's number of job ids",
        "",
        f"`make bench-tenants` (bench/tenant_latency.py) on {res['cpu']}, {res['date']}. One `teacher serve` (the "
        "tiny teacher of bench/faultlib.py: 2 layers, hidden 128; one worker, "
        f"`--torch-threads {res['torch_threads']}`; its own Redis; two tokens). B sends one request at a time "
        f"(24 prompt + 16 scored tokens, top-8; {res['pause_s'] * 1000:.0f} ms between them) for "
        f"{res['seconds']:.0f} s per setting; A keeps {res['flood']} requests of the same size in flight, on "
        "one job id or over 200.",
        "",
        "| setting | B requests | B p50 (ms) | B p99 (ms) | halves p50 | halves p99 | A answers/s | before (issue) p50 / p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in res["settings"].items():
        before = ISSUE_BEFORE_MS[name]
        a_rps = f"{row['a_rps']:.0f}" if "a_rps" in row else "-"
        lines.append(
            f"| {name} | {row['n']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
            f"{' / '.join(f'{x:.1f}' for x in row['halves_p50_ms'])} | "
            f"{' / '.join(f'{x:.1f}' for x in row['halves_p99_ms'])} | {a_rps} | {before[0]:,} / {before[1]:,} |"
        )
    one, many = res["settings"]["A on 1 job"], res["settings"]["A on 200 jobs"]
    lines += [
        "",
        f"A on 200 jobs against A on 1 job: B's p50 x{many['p50_ms'] / one['p50_ms']:.2f}, p99 "
        f"x{many['p99_ms'] / one['p99_ms']:.2f} (the issue, before: x{1433 / 193:.1f} and x{7795 / 1881:.1f}). "
        f"Failures: B {sum(r['b_failed'] for r in res['settings'].values())}, "
        f"A {sum(r.get('a_failed', 0) for r in res['settings'].values())}.",
        "",
        "The figures are noisy: the 2 cores were shared with a long benchmark of another session while this ran "
        "(this one under `nice -n 15`), so what counts is the ratio between settings measured side by side, not "
        "the milliseconds. B's latency under a flood is one batch: its request is claimed in the first round "
        "of the next batch (one request per tenant per round), whatever A's job count; against B alone it grows "
        "by the time of a full batch of A's requests. The `before` column is the issue's measurement (another "
        "machine and load, per-job fairness).",
        "",
        "![B's p50 and p99 per setting](tenant_latency.png)",
    ]
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["settings"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    for off, key, label in ((-0.2, "p50_ms", "p50"), (0.2, "p99_ms", "p99")):
        vals = [res["settings"][n][key] for n in names]
        bars = ax.bar(x + off, vals, 0.4, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylabel("tenant B latency (ms)")
    ax.set_title(f"B's latency against A's job ids ({res['cpu']}, busy)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="B's measurement per setting")
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--pause-s", type=float, default=0.02)
    ap.add_argument("--flood", type=int, default=256, help="A's requests in flight")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "tenant_latency")
    args = ap.parse_args(argv)
    res = {
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": args.seconds,
        "pause_s": args.pause_s,
        "flood": args.flood,
        "torch_threads": args.torch_threads,
        "settings": {},
    }
    with tempfile.TemporaryDirectory(prefix="pd-tenants-") as tmp:
        tmp = Path(tmp)
        teacher, _ = tiny_models(tmp / "models")
        tokens = tmp / "tokens.txt"
        tokens.write_text(f"{TOKEN_A} team-a/\n{TOKEN_B} team-b/\n")
        redis = RedisProcess(workdir=str(tmp))
        redis.start()
        flags = {"auth-tokens": str(tokens), "torch-threads": str(args.torch_threads)}
        front = TeacherProcess(teacher, redis.url, tmp / "serve.log", flags=flags)
        try:
            front.wait_healthy(120)
            asyncio.run(tenant_b(front.target, 3.0, args.pause_s))  # warm-up: compile paths, fill caches
            for name, jobs in SETTINGS:
                res["settings"][name] = row = run_setting(front.target, jobs, args)
                print(f"{name}: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms ({row['n']} requests)")
        finally:
            front.stop()
            redis.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    plot(res, args.out.with_suffix(".png"))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
