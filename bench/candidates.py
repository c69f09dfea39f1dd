"""Scoring the student's own candidates (issue 10, section 4): reverse_kl_candidates against reverse_kl_full and
reverse_kl_topk, on the testbed's `plan` pair, and what each request kind costs the teacher and the wire.

Three measurements, in one run:
- training: the demo's setting (prefix L = 2, the student's trunk frozen, 32 rollouts a step), the same seeds
  and steps for each loss, the in-process teacher; the held-out KL (full rows, exact) and accuracy at every
  evaluation, and the per-step Monte-Carlo KL at the trained positions;
- wire: serialized ScoreResponse (and ScoreRequest) bytes per scored position for each request kind, on the
  testbed teacher (V = 25) and, when it is prepared locally, SmolLM2-135M (V = 49,152);
- throughput: positions/s of one in-process engine per request kind (medians of interleaved repeats).

    .venv/bin/python bench/candidates.py                      # writes docs/results/candidates.{md,json,png}
    .venv/bin/python bench/candidates.py --quick --out /tmp/c  # 1 seed, 4 steps, few prompts
    .venv/bin/python bench/candidates.py --report-only        # the report again from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LOSSES = ("reverse_kl_full", "reverse_kl_topk", "reverse_kl_candidates")
"""The default comparison; `--losses` names others, a label `LOSS@KEY=VALUE[@...]` adding config settings (e.g.
`reverse_kl_candidates@candidates=64`)."""
K = 4
"""Teacher top-k of reverse_kl_topk and student top-C of reverse_kl_candidates (of the testbed's 25 tokens)."""
RUN = [
    "prompts=builtin:plan",
    "batch_size=32",
    "micro_batch_size=32",
    "lr=3e-4",
    "max_new_tokens=120",
    "prefix.schedule=constant",
    "prefix.length=2",
    "freeze=[model.embed_tokens,model.layers]",
    f"top_k={K}",
    f"candidates={K}",
    "eval.prompts=100",
    "eval.batch_size=100",
    "eval.max_new_tokens=120",
    "eval.head_tokens=16",
    "eval.samples=0",
    "tensorboard=false",
    "progress_bar=false",
]
"""The demo's job (configs/demo.yaml) with fewer steps and held-out prompts; loss, seed, steps come on top."""
SMOLLM2_K = 16
SMOLLM2_RUN = [
    "prompts=builtin:arith",
    "batch_size=8",
    "samples_per_prompt=1",
    "micro_batch_size=4",
    "lr=5e-5",
    "max_new_tokens=64",
    "prefix.schedule=constant",
    "prefix.length=16",
    f"top_k={SMOLLM2_K}",
    f"candidates={SMOLLM2_K}",
    "eval.prompts=16",
    "eval.batch_size=16",
    "eval.max_new_tokens=48",
    "eval.head_tokens=16",
    "eval.samples=0",
    "tensorboard=false",
    "progress_bar=false",
]
"""The SmolLM2 pair's job (configs/demo-smollm2.yaml: SmolLM2-135M -> its first 6 layers, L = 16) with the
trainer's default k = C = 16; loss, seed, steps come on top."""
PAIRS = {  # name -> (run settings, k = C, plot title, results file, --quick steps and eval interval)
    "plan": (RUN, K, "plan, L=2, trunk frozen", "candidates.json", (4, 2)),
    "smollm2": (
        SMOLLM2_RUN,
        SMOLLM2_K,
        "SmolLM2-135M -> 6 layers, arith, L=16",
        "candidates_smollm2.json",
        (2, 1),
    ),
}
KINDS = {
    "token": {},
    f"top-{K}": {"top_k": K},
    f"candidates-{K}": {"candidates": K},
    "full float32": {"full": True},
    "full float16": {"full": True, "full_dtype": "float16"},
}
"""Request kinds of the wire and throughput measurements: ScoreRequest fields (candidates: C random ids)."""


def labels_of(data: dict) -> list[str]:
    """The run labels of `data`, in the order first run."""
    return list(dict.fromkeys(r["loss"] for r in data["runs"]))


def train_runs(
    seeds: list[int],
    steps: int,
    every: int,
    work: Path,
    quick: bool,
    pair_name: str = "plan",
    losses: tuple[str, ...] = LOSSES,
) -> list[dict]:
    """Each loss x seed from the same student with the in-process teacher: eval and per-step KL curves."""
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.metrics import read_metrics

    if pair_name == "smollm2":
        from services.models.smollm2 import prepare_smollm2

        pair = prepare_smollm2()
    else:
        from services.models.testbed import prepare_pair

        pair = prepare_pair(pair_name)
    run = PAIRS[pair_name][0]
    records = []
    for seed in seeds:
        for label in losses:
            loss, *overrides = label.split("@")
            out = work / pair_name / f"{label.replace('@', '-').replace('=', '')}-s{seed}"
            extra = ["eval.prompts=16", "eval.batch_size=16"] if quick else []
            settings = [*run, f"student={pair.student}", f"teacher=inprocess:{pair.teacher}", f"loss={loss}"]
            settings += overrides
            settings += [f"seed={seed}", f"steps={steps}", f"eval.every={every}", f"output_dir={out}", *extra]
            t0 = time.perf_counter()
            train(load_config(None, settings))
            rows = read_metrics(out)
            evals = [r for r in rows if "eval/kl_head" in r]
            step_rows = [r for r in rows if "loss/reverse_kl_mc" in r]
            records.append(
                {
                    "loss": label,
                    "seed": seed,
                    "wall_s": time.perf_counter() - t0,
                    "eval": [
                        {k: r[k] for k in ("progress/step", "eval/kl_head", "eval/kl_tail", "eval/accuracy")}
                        for r in evals
                    ],
                    "train_kl_mc": [r["loss/reverse_kl_mc"] for r in step_rows],
                }
            )
            e0, e1 = records[-1]["eval"][0], records[-1]["eval"][-1]
            print(
                f"{label:>22} seed {seed}: kl_head {e0['eval/kl_head']:.3f} -> {e1['eval/kl_head']:.3f}, "
                f"accuracy {e0['eval/accuracy']:.3f} -> {e1['eval/accuracy']:.3f}, {records[-1]['wall_s']:.0f} s",
                flush=True,
            )
    return records


def _requests(vocab: int, n: int, prompt: int, completion: int, kind: dict, seed: int = 0):
    """`n` requests of random ids with the fields of `kind` (candidates: C distinct random ids per position)."""
    import numpy as np

    from services.teacher.types import ScoreRequest

    rng = np.random.default_rng(seed)
    fields = {k: v for k, v in kind.items() if k != "candidates"}
    reqs = []
    for i in range(n):
        cand = None
        if "candidates" in kind:
            cand = np.argsort(rng.random((completion, vocab)), axis=1)[:, : kind["candidates"]]
        reqs.append(
            ScoreRequest(
                rng.integers(0, vocab, prompt),
                rng.integers(0, vocab, completion),
                request_id=f"r{i}",
                candidate_ids=cand,
                **fields,
            )
        )
    return reqs


def engine_figures(model: str, n: int, prompt: int, completion: int, repeats: int) -> dict:
    """Wire bytes per position and positions/s for each request kind, on one in-process engine."""
    from services.teacher.engine import load_engine

    engine = load_engine(model, prompt_cache_mb=0, max_candidates=max(64, K))
    V = engine.info.vocab_size
    batches = {name: _requests(V, n, prompt, completion, kind) for name, kind in KINDS.items()}
    positions = n * completion
    engine.score(batches["token"])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in KINDS}
    results = {}
    for _ in range(repeats):  # interleaved, so a busy moment of the shared machine hits every kind alike
        for name, reqs in batches.items():
            t0 = time.perf_counter()
            results[name] = engine.score(reqs)
            times[name].append(time.perf_counter() - t0)
    out = {"model": model, "vocab": V, "requests": n, "prompt": prompt, "completion": completion, "kinds": {}}
    for name, reqs in batches.items():
        resp = sum(len(r.to_pb().SerializeToString()) for r in results[name])
        req = sum(len(r.to_pb().SerializeToString()) for r in reqs)
        out["kinds"][name] = {
            "response_bytes_per_position": resp / positions,
            "request_bytes_per_position": req / positions,
            "positions_per_s": positions / statistics.median(times[name]),
            "times_s": times[name],
        }
        print(f"{Path(model).name} {name:>14}: {out['kinds'][name]}", flush=True)
    return out


def smollm2_teacher() -> str | None:
    """The prepared SmolLM2-135M teacher folder, if this machine has it (nothing is downloaded)."""
    from services.models.smollm2 import default_cache

    path = default_cache() / "smollm2-135m-instruct" / "teacher"
    return str(path) if (path / "config.json").exists() else None


def _spread(values: list[float]) -> str:
    """mean, with min-max over seeds when there are several."""
    m = statistics.mean(values)
    return f"{m:.3f}" if len(values) == 1 else f"{m:.3f} [{min(values):.3f}, {max(values):.3f}]"


def tables(data: dict) -> str:
    """The markdown tables of candidates.md: training per loss, then wire and throughput per engine."""
    lines = [
        "| loss | eval KL head before | after | KL reduction per step | eval KL tail after | accuracy before "
        "| after | train MC KL, last 5 steps | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for loss in labels_of(data):
        runs = [r for r in data["runs"] if r["loss"] == loss]
        e0 = [r["eval"][0] for r in runs]
        e1 = [r["eval"][-1] for r in runs]
        per_step = [
            (a["eval/kl_head"] - b["eval/kl_head"]) / data["steps"] for a, b in zip(e0, e1, strict=True)
        ]
        last = [statistics.mean(r["train_kl_mc"][-5:]) for r in runs]
        cells = [
            _spread([e["eval/kl_head"] for e in e0]),
            _spread([e["eval/kl_head"] for e in e1]),
            _spread(per_step),
            _spread([e["eval/kl_tail"] for e in e1]),
            _spread([e["eval/accuracy"] for e in e0]),
            _spread([e["eval/accuracy"] for e in e1]),
            _spread(last),
            f"{statistics.mean(r['wall_s'] for r in runs):.0f}",
        ]
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    for eng in data["engines"]:
        lines += [
            "",
            f"{Path(eng['model']).parent.name}/{Path(eng['model']).name}: V = {eng['vocab']}, {eng['requests']} "
            f"requests of {eng['prompt']} prompt + {eng['completion']} completion tokens",
            "",
            "| request kind | response bytes / position | request bytes / position | positions/s (median) |",
            "| --- | --- | --- | --- |",
        ]
        for name, k in eng["kinds"].items():
            lines.append(
                f"| {name} | {k['response_bytes_per_position']:.1f} | {k['request_bytes_per_position']:.1f} "
                f"| {k['positions_per_s']:.0f} |"
            )
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """Held-out KL (head) at each evaluation and the per-step Monte-Carlo KL, per loss (thin: each seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, loss in enumerate(labels_of(data)):
        color = f"C{i}"
        for r in (r for r in data["runs"] if r["loss"] == loss):
            xs = [e["progress/step"] for e in r["eval"]]
            a.plot(xs, [e["eval/kl_head"] for e in r["eval"]], color=color, marker="o", alpha=0.7,
                   label=loss if r["seed"] == data["seeds"][0] else None)  # fmt: skip
            b.plot(range(1, len(r["train_kl_mc"]) + 1), r["train_kl_mc"], color=color, alpha=0.6,
                   label=loss if r["seed"] == data["seeds"][0] else None)  # fmt: skip
    a.set(xlabel="step", ylabel="held-out reverse KL, first 16 tokens (nats/token)", yscale="log")
    b.set(xlabel="step", ylabel="training MC reverse KL at the trained positions", yscale="log")
    title = data.get("title", PAIRS["plan"][2])  # files written before titles were recorded are plan's
    a.set_title(f"{title}, k = C = {data['k']}, seeds {data['seeds']}")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-candidates")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--losses",
        default=",".join(LOSSES),
        help="comma-separated run labels: a loss, optionally with @KEY=VALUE settings "
        "(e.g. reverse_kl_candidates@candidates=64)",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add these runs to the existing JSON (same pair, steps and seeds) instead of replacing it",
    )
    parser.add_argument(
        "--pair",
        choices=("plan", "smollm2"),
        default="plan",
        help="plan: the testbed pair plus the wire and throughput tables (candidates.json); smollm2: the training "
        "comparison on the SmolLM2 pair alone (candidates_smollm2.json)",
    )
    args = parser.parse_args()
    settings, k, title, name, quick_steps = PAIRS[args.pair]
    path = args.out / name
    if not args.report_only:
        seeds = [0] if args.quick else list(range(args.seeds))
        steps, every = quick_steps if args.quick else (args.steps, args.every)
        data = {"settings": settings, "k": k, "title": title, "seeds": seeds, "steps": steps, "engines": []}
        if args.pair == "plan" and not args.append:  # the wire and throughput tables
            from services.models.testbed import prepare_pair

            data["engines"].append(
                engine_figures(str(prepare_pair("plan").teacher), 32, 6, 64, 1 if args.quick else 5)
            )
            big = smollm2_teacher()
            if big and not args.quick:
                data["engines"].append(engine_figures(big, 16, 32, 64, 3))
        losses = tuple(x for x in args.losses.split(",") if x)
        runs = train_runs(seeds, steps, every, args.work, args.quick, args.pair, losses)
        if args.append:
            old = json.loads(path.read_text())
            assert (old["steps"], old["seeds"]) == (steps, seeds), "--append needs the same steps and seeds"
            new_labels = {r["loss"] for r in runs}
            old["runs"] = [r for r in old["runs"] if r["loss"] not in new_labels] + runs
            data = old
        else:
            data["runs"] = runs
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
    data = json.loads(path.read_text())
    plot(data, path.with_suffix(".png"))
    print(tables(data))


if __name__ == "__main__":
    main()
