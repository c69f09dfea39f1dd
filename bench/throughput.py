"""Throughput of the teacher: the raw transformers forward pass vs the in-process engine vs the full service.

The three are measured side by side in one run, interleaved over repeats, on the same requests, and reported
as tokens/s and as ratios to the raw forward pass (the machine is shared and noisy: ratios travel, absolute
numbers do not). "raw" is what a user would write by hand: one padded forward pass per batch over the full
sequence, log_softmax over every position, gather of the completion tokens. "service" is the whole path a
student job takes: gRPC ScoreStream -> front-end -> Redis -> worker -> engine -> Redis -> front-end -> client.

    .venv/bin/python bench/throughput.py                      # SmolLM2-135M teacher (prepared if needed)
    .venv/bin/python bench/throughput.py --model /tmp/tiny --requests 64 --repeats 3

Writes bench/results/throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from services.teacher.engine import load_engine  # noqa: E402
from services.teacher.engine.base import split_by_tokens  # noqa: E402
from services.teacher.types import ScoreRequest  # noqa: E402


def make_requests(n: int, vocab: int, prompt_len: int, completion_len: int, top_k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        ScoreRequest(
            rng.integers(0, vocab, prompt_len),
            rng.integers(0, vocab, completion_len),
            request_id=f"b{i}",
            job_id="bench",
            top_k=top_k,
        )
        for i in range(n)
    ]


@torch.inference_mode()
def run_raw(model, reqs, budget: int) -> None:
    """The hand-written baseline: padded batch, full logits, log_softmax everywhere, gather."""
    for chunk in split_by_tokens(reqs, budget, list(range(len(reqs)))):
        batch = [reqs[i] for i in chunk]
        S = max(r.num_tokens for r in batch)
        ids = torch.zeros((len(batch), S), dtype=torch.long)
        mask = torch.zeros((len(batch), S), dtype=torch.long)
        for j, r in enumerate(batch):
            seq = np.concatenate([r.prompt_token_ids, r.completion_token_ids])
            ids[j, : seq.size] = torch.from_numpy(seq)
            mask[j, : seq.size] = 1
        logprobs = torch.log_softmax(
            model(input_ids=ids, attention_mask=mask).logits.float(), -1
        )  # (B, S, V)
        for j, r in enumerate(batch):
            p = r.prompt_token_ids.size
            tgt = torch.from_numpy(r.completion_token_ids)
            lp = logprobs[j, p - 1 : r.num_tokens - 1].gather(1, tgt[:, None])
            if r.top_k:
                logprobs[j, p - 1 : r.num_tokens - 1].topk(r.top_k, -1)
            del lp


def run_service(target: str, reqs, max_in_flight: int) -> None:
    from services.teacher.client import TeacherClient

    async def go():
        async with TeacherClient(target, max_in_flight=max_in_flight) as c:
            await c.score_many(reqs)

    asyncio.run(go())


def start_service(model: str, budget: int, batch_size: int, log: Path):
    """Redis + `teacher serve` (1 worker) on free ports; returns (gRPC target, stop function)."""
    from services.teacher.launch import TeacherProcess
    from services.teacher.redis_server import RedisProcess

    redis_proc = RedisProcess().start()
    flags = {
        "max-batch-tokens": budget,
        "max-batch-size": batch_size,
        "torch-threads": torch.get_num_threads(),
    }
    teacher = TeacherProcess(model, redis_proc.url, log, flags=flags)
    teacher.wait_healthy()

    def stop():
        teacher.stop()
        redis_proc.stop()

    return teacher.target, stop


def report(times: dict[str, list[float]], tokens: int, model: str, args, out: Path) -> None:
    """Prints the table of the modes against the raw forward and writes it to OUT.md and OUT.json."""
    from rich.console import Console
    from rich.table import Table

    raw = statistics.median(times["raw forward (transformers)"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"mode": name, "median_s": med, "tokens_per_s": tokens / med, "time_vs_raw": med / raw})
    table = Table(
        title=f"teacher throughput: {Path(model).name}, {args.requests} requests x "
        f"({args.prompt_len}+{args.completion_len}) tokens, top-k {args.top_k}, "
        f"{torch.get_num_threads()} threads"
    )
    for col in ("mode", "median s", "tokens/s", "time vs raw"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["mode"], f"{r['median_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['time_vs_raw']:.3f}"
        )
    Console().print(table)
    meta = {
        "model": model,
        **{k: v for k, v in vars(args).items() if k != "out"},
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "times": times,
    }
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=2))
    lines = ["| mode | median s | tokens/s | time vs raw |", "|---|---|---|---|"]
    lines += [
        f"| {r['mode']} | {r['median_s']:.3f} | {r['tokens_per_s']:.0f} | {r['time_vs_raw']:.3f} |"
        for r in rows
    ]
    out.with_suffix(".md").write_text(
        f"# Teacher throughput\n\n`{' '.join(sys.argv)}`\n\n{table.title}\n\n" + "\n".join(lines) + "\n"
    )
    print(f"wrote {out.with_suffix('.md')} and .json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="teacher folder (default: SmolLM2-135M, prepared if needed)"
    )
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=2048, help="token budget of one batch (all modes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput"))
    args = ap.parse_args()

    from rich.progress import track
    from transformers import AutoModelForCausalLM

    model = args.model
    if model is None:
        from services.models.smollm2 import prepare_smollm2

        model = str(prepare_smollm2().teacher)
    engine = load_engine(model)
    raw_model = AutoModelForCausalLM.from_pretrained(model).eval()
    reqs = make_requests(
        args.requests, engine.info.vocab_size, args.prompt_len, args.completion_len, args.top_k
    )
    tokens = sum(r.num_tokens for r in reqs)
    batch_size = max(1, args.batch_tokens // (args.prompt_len + args.completion_len))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target, stop = start_service(model, args.batch_tokens, batch_size, out.with_suffix(".teacher.log"))
    modes = {
        "raw forward (transformers)": lambda: run_raw(raw_model, reqs, args.batch_tokens),
        "engine (in-process)": lambda: engine.score(reqs),
        "service (gRPC + Redis + worker)": lambda: run_service(target, reqs, max_in_flight=len(reqs)),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for fn in modes.values():  # warm-up: first-call costs (allocator, thread pools, connections)
            fn()
        for _ in track(range(args.repeats), description="benchmarking"):
            for name, fn in modes.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        stop()

    report(times, tokens, model, args, out)


if __name__ == "__main__":
    main()
