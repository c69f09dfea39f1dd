"""Teacher throughput: the raw forward a user would write, the engine, the service (gRPC with 1/4/16 streams,
full rows, HTTP) and vLLM, per dtype, on the same inputs in one run; and prompt reuse on distillation traffic.

Two kinds of traffic, both scored as the actual-token logprob plus the top-20 at every completion position:

- uniform: `--sequences` sequences of real text (this repository's docs, tokenized), `--prompt-len` tokens of
  context and the rest scored; every prompt distinct (no reuse possible);
- distillation: chat-templated `builtin:arith` prompts, completions of 16..64 tokens, `samples_per_prompt` 4,
  two jobs on the same prompts (each prompt scored 8 times), through a service with prompt reuse on and one
  with it off (`--prompt-cache-mb 0`).

Modes are interleaved over `--repeats` (medians reported; the machine is shared, so ratios measured side by
side travel, absolute figures do not). Each dtype's error is taken against the float32 engine on the uniform
inputs. vLLM (`prompt_logprobs=20`) runs in its own venv (`.venv-vllm`, `make vllm`) as a subprocess right
after the others, when that venv exists.

    .venv/bin/python bench/teacher_throughput.py                 # SmolLM2-135M, all dtypes (~15 min, 2 cores)
    .venv/bin/python bench/teacher_throughput.py --quick --out /tmp/tt.json   # tiny model, < 2 min

Writes docs/results/teacher_throughput.{md,json,png} (or, with --quick, the JSON at --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from services.teacher.engine import cpu_heap, load_engine  # noqa: E402
from services.teacher.engine.base import split_by_tokens  # noqa: E402
from services.teacher.settings import TeacherSettings  # noqa: E402
from services.teacher.types import ScoreRequest  # noqa: E402

TOP_K = 20
DTYPES = {  # name -> teacher settings
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "bf16+fp32 head": {"dtype": "bfloat16", "lm_head_dtype": "float32"},
}
STREAMS = (1, 4, 16)


# ----------------------------------------------------------------------------------------------- inputs
def uniform_requests(tokenizer, n: int, length: int, prompt_len: int) -> list[ScoreRequest]:
    """`n` windows of `length` tokens of real text (the repository's markdown), `prompt_len` of them context."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")))
    ids = np.array(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    assert ids.size >= n * length, "not enough text for the requested windows"
    step = ids.size // n
    return [
        ScoreRequest(
            ids[i * step : i * step + prompt_len],
            ids[i * step + prompt_len : i * step + length],
            request_id=f"u{i}",
            job_id="bench",
            top_k=TOP_K,
        )
        for i in range(n)
    ]


def distillation_requests(tokenizer, prompts: int, samples: int = 4, jobs: int = 2, seed: int = 0):
    """Prefix-OPD traffic: chat-templated builtin:arith prompts, `samples` completions of 16..64 tokens each,
    the same prompts from `jobs` jobs (their samples differ), in the order the jobs would send them."""
    from trainer.tasks import load_task, render

    rng = np.random.default_rng(seed)
    task = load_task("builtin:arith")
    rendered = [np.array(render(ex, tokenizer), dtype=np.int64) for ex in task.train[:prompts]]
    vocab = len(tokenizer)
    reqs = []
    for job in range(jobs):
        for p, prompt in enumerate(rendered):
            for s in range(samples):
                completion = rng.integers(0, vocab, int(rng.integers(16, 65)))
                reqs.append(
                    ScoreRequest(
                        prompt, completion, request_id=f"j{job}p{p}s{s}", job_id=f"job{job}", top_k=TOP_K
                    )
                )
    return reqs


def scored_positions(reqs) -> int:
    return sum(r.completion_token_ids.size for r in reqs)


# ------------------------------------------------------------------------------------------------ modes
@torch.inference_mode()
def run_raw(model, reqs: list[ScoreRequest], budget: int, device: str | torch.device = "cpu") -> None:
    """The hand-written baseline: padded batches, logits at every position, log_softmax, gather, top-k."""
    for chunk in split_by_tokens(reqs, budget, list(range(len(reqs)))):
        batch = [reqs[i] for i in chunk]
        S = max(r.num_tokens for r in batch)
        ids_BS = torch.zeros((len(batch), S), dtype=torch.long)
        mask_BS = torch.zeros((len(batch), S), dtype=torch.long)
        for j, r in enumerate(batch):
            seq = np.concatenate([r.prompt_token_ids, r.completion_token_ids])
            ids_BS[j, : seq.size] = torch.from_numpy(seq)
            mask_BS[j, : seq.size] = 1
        logits_BSV = model(input_ids=ids_BS.to(device), attention_mask=mask_BS.to(device)).logits
        logprobs_BSV = torch.log_softmax(logits_BSV.float(), -1)
        for j, r in enumerate(batch):
            rows_TV = logprobs_BSV[j, r.prompt_token_ids.size - 1 : r.num_tokens - 1]
            rows_TV.gather(1, torch.from_numpy(r.completion_token_ids).to(device)[:, None]).cpu()
            rows_TV.topk(r.top_k, -1).values.cpu()


def run_grpc(target: str, reqs: list[ScoreRequest], streams: int) -> None:
    """`streams` concurrent clients (one ScoreStream each), the requests dealt round-robin."""
    from services.teacher.client import TeacherClient

    async def one(part):
        async with TeacherClient(target, max_in_flight=256) as c:
            await c.score_many(part)

    async def go():
        await asyncio.gather(*(one(reqs[i::streams]) for i in range(streams)))

    asyncio.run(go())


def run_http(url: str, reqs: list[ScoreRequest], concurrency: int = 4) -> None:
    import httpx

    async def go():
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:

            async def one(r):
                async with sem:
                    body = {
                        "prompt_token_ids": r.prompt_token_ids.tolist(),
                        "completion_token_ids": r.completion_token_ids.tolist(),
                        "top_k": r.top_k,
                        "job_id": r.job_id,
                    }
                    (await c.post("/v1/logprobs", json=body)).raise_for_status()

            await asyncio.gather(*(one(r) for r in reqs))

    asyncio.run(go())


def with_full(reqs: list[ScoreRequest]) -> list[ScoreRequest]:
    """The same requests asking for full float16 rows (and no top-k)."""
    from dataclasses import replace

    return [replace(r, top_k=0, full=True, full_dtype="float16") for r in reqs]


# ------------------------------------------------------------------------------------------ measurement
def timed(modes: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each mode: one warm-up, then `repeats` rounds with the modes interleaved."""
    from rich.progress import track

    for fn in modes.values():
        fn()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in track(range(repeats), description=f"{len(modes)} modes x {repeats}"):
        for name, fn in modes.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def errors_vs_float32(engine, ref, reqs) -> dict[str, float]:
    """Max / mean abs error of the actual-token logprob and top-1 agreement, against the float32 engine on torch's
    own kernels (bit for bit a plain forward)."""
    got, want = engine.score(reqs), ref.score(reqs)
    diff = np.concatenate(
        [np.abs(a.token_logprobs - b.token_logprobs) for a, b in zip(got, want, strict=True)]
    )
    top1 = np.concatenate([a.top_k_ids[:, 0] == b.top_k_ids[:, 0] for a, b in zip(got, want, strict=True)])
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "top1_changed": float(1 - top1.mean()),
    }


def wire_bytes(engine, reqs: list[ScoreRequest]) -> dict[str, float]:
    """Bytes on the wire per scored position (request + response protobufs; HTTP JSON for the top-k reply)."""
    positions = scored_positions(reqs)
    out = {}
    for name, rs in (("top-20", reqs), ("full float16", with_full(reqs))):
        res = engine.score(rs)
        n = sum(
            len(r.to_pb().SerializeToString()) + len(x.to_pb().SerializeToString())
            for r, x in zip(rs, res, strict=True)
        )
        out[f"grpc {name}"] = n / positions
    return out


def start_teacher(model: str, settings: dict, budget: int, log: Path, **extra):
    """Redis + `teacher serve` (1 worker) on free ports; returns (teacher process, stop function)."""
    from services.teacher.launch import TeacherProcess
    from services.teacher.redis_server import RedisProcess

    redis_proc = RedisProcess().start()
    flags = {k.replace("_", "-"): v for k, v in {**settings, **extra}.items()}
    flags |= {"max-batch-tokens": budget, "max-batch-size": 64, "torch-threads": torch.get_num_threads()}
    teacher = TeacherProcess(model, redis_proc.url, log, flags=flags)
    teacher.wait_healthy()

    def stop():
        teacher.stop()
        redis_proc.stop()

    return teacher, stop


def vllm_tok_s(model: str, dtype: str, reqs: list[ScoreRequest], repeats: int) -> float | None:
    """Positions/s of vLLM `prompt_logprobs=20` on the same requests, in `.venv-vllm` (None without it)."""
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        return None
    with tempfile.TemporaryDirectory() as d:
        spec = Path(d) / "reqs.json"
        spec.write_text(
            json.dumps(
                {
                    "model": model,
                    "dtype": dtype,
                    "top_k": TOP_K,
                    "repeats": repeats,
                    "requests": [
                        [r.prompt_token_ids.tolist(), r.completion_token_ids.tolist()] for r in reqs
                    ],
                }
            )
        )
        env = os.environ | {
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CACHE_ROOT": str(ROOT / ".cache" / "vllm"),
            # the same glibc heap thresholds as our CPU engine (engine/cpu_heap.py), so neither side is timed
            # with page faults the other avoids
            "MALLOC_MMAP_THRESHOLD_": str(cpu_heap.KEEP_BYTES),
            "MALLOC_TRIM_THRESHOLD_": str(cpu_heap.TRIM_BYTES),
        }
        proc = subprocess.run(
            [str(python), str(ROOT / "bench" / "vllm_timing.py"), str(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            print(f"vLLM timing failed ({dtype}):\n{proc.stderr[-2000:]}")
            return None
        seconds = json.loads(proc.stdout.strip().splitlines()[-1])["median_s"]
    return scored_positions(reqs) / seconds


# ----------------------------------------------------------------------------------------------- a dtype
def measure_dtype(name: str, settings: dict, model: str, uniform, distill, ref_engine, args, workdir: Path):
    """One record: every mode of one dtype, interleaved, and its error against float32."""
    from transformers import AutoModelForCausalLM

    raw_model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, settings["dtype"])).eval()
    engine = load_engine(model, prompt_cache_mb=0, **settings)
    cached_engine = load_engine(model, **settings)
    budget = args.batch_tokens
    t_on, stop_on = start_teacher(model, settings, budget, workdir / f"{name}-on.log".replace(" ", "_"))
    t_off, stop_off = start_teacher(
        model, settings, budget, workdir / f"{name}-off.log".replace(" ", "_"), prompt_cache_mb=0
    )
    full = with_full(uniform)
    modes = {
        "raw forward": lambda: run_raw(raw_model, uniform, budget),
        "engine in-process": lambda: engine.score(uniform),
        **{
            f"service {n} stream{'s' * (n > 1)}": (lambda n=n: run_grpc(t_off.target, uniform, n))
            for n in STREAMS
        },
        "service full rows float16": lambda: run_grpc(t_off.target, full, 4),
        "HTTP (4 concurrent)": lambda: run_http(t_off.http, uniform),
        "distill: service, reuse off": lambda: run_grpc(t_off.target, distill, 4),
        "distill: service, reuse on": lambda: run_grpc(t_on.target, distill, 4),
        "distill: engine, reuse off": lambda: engine.score(distill),
        "distill: engine, reuse on": lambda: cached_engine.score(distill),
    }
    if args.quick:
        for k in ("service 1 stream", "service 16 streams", "HTTP (4 concurrent)"):
            modes.pop(k)
    try:
        times = timed(modes, args.repeats)
    finally:
        stop_on()
        stop_off()
    before = cached_engine.tokens_reused
    cached_engine.score(distill)  # every prompt is kept by now: what a long run reuses
    reused = cached_engine.tokens_reused - before
    record = summarize(times, uniform, distill)
    record |= {
        "dtype": name,
        "settings": settings,
        "error_vs_float32": errors_vs_float32(engine, ref_engine, uniform),
        "prompt_tokens_reused_share": reused / sum(r.prompt_token_ids.size for r in distill),
        "teacher_tokens_saved_share": reused / sum(r.num_tokens for r in distill),
        "wire_bytes_per_position": wire_bytes(engine, uniform[:4]),
        "linear_kernels": engine.linear_kernels,
        "head_kernels": engine.head_kernels,
        "attention": engine.attention,
    }
    if not args.quick:
        record["vllm_tok_s"] = vllm_tok_s(model, settings["dtype"], uniform, args.repeats)
        if record["vllm_tok_s"]:
            record["vllm_vs_raw"] = record["vllm_tok_s"] / record["raw_tok_s"]
    return record


def add_vllm(path: Path, model: str, uniform, args) -> None:
    """For records of `path` without vLLM figures: vLLM timed between two raw-forward timings of the same dtype
    (so its ratio to raw is measured side by side), written into the record."""
    from transformers import AutoModelForCausalLM

    run = json.loads(path.read_text())
    for r in run["records"]:
        if r.get("vllm_tok_s"):  # measured in the main run, after the other modes
            r.setdefault("vllm_vs_raw", r["vllm_tok_s"] / r["raw_tok_s"])
            continue
        dtype = r["settings"]["dtype"]
        raw_model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
        raw = timed({"raw forward": lambda m=raw_model: run_raw(m, uniform, args.batch_tokens)}, args.repeats)
        vllm = vllm_tok_s(model, dtype, uniform, args.repeats)
        raw2 = timed(
            {"raw forward": lambda m=raw_model: run_raw(m, uniform, args.batch_tokens)}, args.repeats
        )
        raw_tok_s = scored_positions(uniform) / statistics.median(raw["raw forward"] + raw2["raw forward"])
        if vllm:
            r |= {"vllm_tok_s": vllm, "vllm_raw_tok_s": raw_tok_s, "vllm_vs_raw": vllm / raw_tok_s}
            print(f"{r['dtype']}: vLLM {vllm:.0f} pos/s, raw beside it {raw_tok_s:.0f} pos/s")
    run["vllm_tok_s"] = run["records"][0].get("vllm_tok_s")
    path.write_text(json.dumps(run, indent=2))
    write_between_markers(path.with_suffix(".md"), markdown(run))
    plot(run, path.with_suffix(".png"))


def summarize(times: dict[str, list[float]], uniform, distill) -> dict:
    """Positions/s per mode (median time) and the ratios the targets are about."""
    pos = {True: scored_positions(distill), False: scored_positions(uniform)}
    tok_s = {m: pos[m.startswith("distill")] / statistics.median(ts) for m, ts in times.items()}
    raw = tok_s["raw forward"]
    return {
        "tok_s": tok_s,
        "times_s": times,
        "raw_tok_s": raw,
        "service_tok_s": tok_s["service 4 streams"],
        "service_full_tok_s": tok_s["service full rows float16"],
        "http_tok_s": tok_s.get("HTTP (4 concurrent)"),
        "service_vs_raw": tok_s["service 4 streams"] / raw,
        "full_vs_raw": tok_s["service full rows float16"] / raw,
        "shared_prompt_speedup": tok_s["distill: service, reuse on"] / tok_s["distill: service, reuse off"],
    }


# ----------------------------------------------------------------------------------------------- report
TARGETS = (  # (what, value of a record or of the run, threshold)
    ("service >= 0.95x raw", "service_vs_raw", 0.95),
    ("full rows float16 >= 0.8x raw", "full_vs_raw", 0.8),
    ("shared prompts >= 2x uncached service", "shared_prompt_speedup", 2.0),
)


def markdown(run: dict) -> str:
    lines = [
        "# Teacher throughput",
        "",
        f"`{run['command']}` on {run['cpu']} ({run['threads']} threads), model `{Path(run['model']).name}`. Uniform "
        f"traffic: {run['uniform']}; distillation traffic: {run['distill']}; batches of at most "
        f"{run.get('batch_tokens', 4096)} tokens (B x S) for the raw forward and the service. Scored positions per second, medians "
        f"of {run['repeats']} interleaved repeats; ratios are to the raw forward of the same dtype in the same run.",
        "",
    ]
    runs = {json.dumps(r.get("run"), sort_keys=True) for r in run["records"]}
    if len(runs) > 1:  # --merge: say which run measured each column
        lines += [
            "Columns from separate runs (compare ratios, not positions/s, across them): "
            + "; ".join(
                f"{r['dtype']}: `{r['run']['command']}` on {r['run']['date']}, {r['run']['cpu']}"
                for r in run["records"]
            )
            + ".",
            "",
        ]
    modes = list(run["records"][0]["tok_s"])
    head = "| mode | " + " | ".join(f"{r['dtype']} pos/s (x raw)" for r in run["records"]) + " |"
    lines += [head, "|---" * (1 + len(run["records"])) + "|"]
    for m in modes:
        cells = []
        for r in run["records"]:
            ratio = "" if m.startswith("distill") else f" ({r['tok_s'][m] / r['raw_tok_s']:.2f}x)"
            cells.append(f"{r['tok_s'][m]:.0f}{ratio}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if any(r.get("vllm_tok_s") for r in run["records"]):
        lines.append(
            "| vLLM-cpu prompt_logprobs=20 (x the raw forward timed beside it) | "
            + " | ".join(
                f"{r['vllm_tok_s']:.0f} ({r['vllm_vs_raw']:.2f}x)" if r.get("vllm_tok_s") else "n/a"
                for r in run["records"]
            )
            + " |"
        )
    lines += [
        "",
        "| per dtype | " + " | ".join(r["dtype"] for r in run["records"]) + " |",
        "|---" * (1 + len(run["records"])) + "|",
    ]
    rows = {
        "linear kernels, trunk / LM head (cpu_linear auto)": lambda r: (
            f"{r.get('linear_kernels', 'torch')} / {r.get('head_kernels', r.get('linear_kernels', 'torch'))}"
        ),
        "attention (cpu_attention auto)": lambda r: r.get("attention", "sdpa"),
        "token logprob max abs error vs a plain float32 forward (nats)": lambda r: (
            f"{r['error_vs_float32']['max_abs']:.3g}"
        ),
        "mean abs error": lambda r: f"{r['error_vs_float32']['mean_abs']:.3g}",
        "top-1 changed": lambda r: f"{100 * r['error_vs_float32']['top1_changed']:.1f}%",
        "shared-prompt speed-up (service)": lambda r: f"{r['shared_prompt_speedup']:.2f}x",
        "prompt tokens reused / teacher tokens saved": lambda r: (
            f"{100 * r['prompt_tokens_reused_share']:.0f}% / {100 * r['teacher_tokens_saved_share']:.0f}%"
        ),
        "gRPC bytes per position, top-20": lambda r: f"{r['wire_bytes_per_position']['grpc top-20']:.0f}",
        "gRPC bytes per position, full float16": lambda r: (
            f"{r['wire_bytes_per_position']['grpc full float16']:.0f}"
        ),
    }
    for label, fn in rows.items():
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in run["records"]) + " |")
    lines += ["", "Targets (issue 10):", ""]
    for what, key, threshold in TARGETS:
        for r in run["records"]:
            ok = "met" if r[key] >= threshold else "missed"
            lines.append(f"- {what}, {r['dtype']}: {r[key]:.2f} ({ok})")
    for r in run["records"]:
        if r.get("vllm_tok_s"):
            v = r["service_vs_raw"] / r["vllm_vs_raw"]  # each against the raw forward timed beside it
            note = (
                ""
                if r["dtype"] in ("float32", "bfloat16")
                else " (against vLLM's plain bfloat16: no float32 head)"
            )
            lines.append(
                f"- service >= 1.1x vLLM, {r['dtype']}{note}: {v:.2f} ({'met' if v >= 1.1 else 'missed'})"
            )
    return "\n".join(lines) + "\n"


def plot(run: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run["records"]
    vllm = "vLLM-cpu prompt_logprobs=20"
    rows = [{**r["tok_s"], vllm: r.get("vllm_tok_s") or 0.0} for r in records]
    modes = list(rows[0])
    fig, ax = plt.subplots(figsize=(11, 5.5))
    width = 0.8 / len(records)
    for j, (r, row) in enumerate(zip(records, rows, strict=True)):
        ax.barh(np.arange(len(modes)) + j * width, [row[m] for m in modes], width, label=r["dtype"])
    ax.set_yticks(np.arange(len(modes)) + 0.4 - width / 2, modes)
    ax.invert_yaxis()
    ax.set_xlabel("scored positions / s (higher is better)")
    model = Path(run["model"])
    ax.set_title(f"teacher throughput, {model.parent.name}/{model.name}, {run['cpu']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the bars
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


BEGIN, END = "<!-- measured: written by bench/teacher_throughput.py -->", "<!-- end measured -->"


def write_between_markers(path: Path, text: str) -> None:
    """Writes `text` between the markers of `path`, keeping the hand-written notes around them."""
    block = f"{BEGIN}\n{text}{END}"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        block = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) :]
    path.write_text(block if block.endswith("\n") else block + "\n")


def cpu_name() -> str:
    """The CPU's model name, family and model numbers, and its widest vector units (a VM may name only the
    vendor: "AMD EPYC" was a Zen 4, family 25 model 17, with half the float32 GEMM rate of an earlier one)."""
    text = Path("/proc/cpuinfo").read_text()

    def field(key: str, default: str) -> str:
        return next(
            (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.split(":", 1)[0].strip() == key),
            default,
        )

    name = (
        f"{field('model name', 'unknown CPU')}, family {field('cpu family', '?')} model {field('model', '?')}"
    )
    flags = field("flags", "").split()
    units = [
        u
        for f, u in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"))
        if f in flags
    ]
    return f"{name} ({', '.join(units or ['no AVX-512'])})"


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="teacher folder (default: SmolLM2-135M; --quick: a tiny model)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny model, float32 and bfloat16, no vLLM, < 2 min")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {list(DTYPES)}")
    ap.add_argument("--sequences", type=int, default=32, help="uniform traffic: windows of real text")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--distill-prompts", type=int, default=8)
    ap.add_argument(
        "--batch-tokens",
        type=int,
        default=TeacherSettings.model_fields["max_batch_tokens"].default,
        help="token budget of a batch (B x S), for the raw forward and the service alike (default: the teacher's)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path (default docs/results/teacher_throughput.json)")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="replace only the measured dtypes' records in --out's JSON, keeping the others (each record names "
        "its own run)",
    )
    ap.add_argument(
        "--add-vllm", action="store_true", help="only time vLLM (and raw beside it) into --out's records"
    )
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="teacher-throughput-"))
    model = args.model
    if args.quick:
        from services.models.tiny import build_tiny

        model = model or str(build_tiny(workdir / "tiny", layers=2, hidden=64, seed=1, init_std=0.2))
        args.repeats, args.sequences, args.length, args.distill_prompts = 1, 8, 128, 4
    elif model is None:
        from services.models.smollm2 import prepare_smollm2

        model = str(prepare_smollm2().teacher)
    names = [d for d in args.dtypes.split(",") if d]
    if args.quick:
        names = [n for n in names if n != "bf16+fp32 head"]
    ref = load_engine(model, prompt_cache_mb=0, cpu_linear="torch")
    uniform = uniform_requests(ref.tokenizer, args.sequences, args.length, args.prompt_len)
    distill = distillation_requests(ref.tokenizer, args.distill_prompts)
    out = Path(args.out) if args.out else ROOT / "docs" / "results" / "teacher_throughput.json"
    if args.add_vllm:
        add_vllm(out, model, uniform, args)
        return
    records = []
    for name in names:
        print(f"== {name}")
        record = measure_dtype(name, DTYPES[name], model, uniform, distill, ref, args, workdir)
        record["run"] = {
            "command": " ".join(["bench/teacher_throughput.py", *sys.argv[1:]]),
            "cpu": cpu_name(),
            "date": time.strftime("%Y-%m-%d"),
        }
        records.append(record)
    if args.merge and out.exists():
        fresh = {r["dtype"]: r for r in records}
        old = json.loads(out.read_text())
        before = {k: old.get(k, "an earlier run") for k in ("command", "cpu", "date")}
        kept = [r if "run" in r else r | {"run": before} for r in old["records"]]
        records = [fresh.pop(r["dtype"], r) for r in kept] + list(fresh.values())
    first = records[0]
    run = {
        "command": " ".join(["bench/teacher_throughput.py", *sys.argv[1:]]),
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
        "threads": torch.get_num_threads(),
        "model": model,
        "repeats": args.repeats,
        "uniform": f"{args.sequences} x {args.length} tokens of real text, {args.prompt_len} of them prompt, top-{TOP_K}",
        "batch_tokens": args.batch_tokens,
        "distill": f"{args.distill_prompts} chat-templated builtin:arith prompts (mean "
        f"{np.mean([r.prompt_token_ids.size for r in distill]):.0f} tokens) x 4 samples of 16..64 tokens x 2 jobs",
        **{
            k: first.get(k)
            for k in (
                "raw_tok_s",
                "service_tok_s",
                "service_full_tok_s",
                "http_tok_s",
                "vllm_tok_s",
                "shared_prompt_speedup",
                "dtype",
            )
        },
        "records": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(run, indent=2))
    text = markdown(run)
    print(text)
    if not args.quick:
        write_between_markers(out.with_suffix(".md"), text)
        plot(run, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
