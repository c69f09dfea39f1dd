"""The CUDA path of the hf engine, on a machine with a GPU: exactness and speed, as a short prepared script.

It builds a SmolLM2-135M-shaped model with random weights from a config folder (`--config`: config.json plus
tokenizer files; the real weights are not needed for timing or for exactness against a plain forward), then on
the GPU, per dtype (float32, bfloat16, bfloat16 with a float32 LM head):

- exactness: the engine's token logprobs against a plain unpadded transformers forward of each sequence, on the
  same GPU, and each dtype's error against the float32 engine;
- speed, interleaved medians: the raw padded forward (logits everywhere, log_softmax, gather, top-20) vs the
  engine in-process on uniform traffic; and prefix-OPD traffic with prompt reuse on and off.

    .venv/bin/python bench/gpu_check.py --write-config .gpu/smollm2     # here: SmolLM2's config + tokenizer
    python3 bench/gpu_check.py --config .gpu/smollm2 --out $OUT/gpu_check.json   # there (`carry: [".gpu"]`)

No service here (the GPU machine has no Redis): the service adds the same overhead as on a CPU, measured there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from teacher_throughput import (  # noqa: E402
    DTYPES,
    distillation_requests,
    run_raw,
    scored_positions,
    uniform_requests,
)

from services.teacher.engine import load_engine  # noqa: E402

CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def write_config(out: Path) -> None:
    """SmolLM2-135M's config and tokenizer files, without weights (a few MB: they travel to the GPU machine)."""
    import shutil

    from services.models.smollm2 import prepare_smollm2

    teacher = Path(prepare_smollm2().teacher)
    out.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        if (teacher / name).exists():
            shutil.copy(teacher / name, out / name)
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


def build_model(config_dir: Path, out: Path) -> Path:
    """A random-weight model of `config_dir`'s architecture, saved with its tokenizer (seeded: reproducible)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
    return out


@torch.inference_mode()
def plain_logprobs(model, req, dev) -> np.ndarray:
    ids = torch.tensor([list(req.prompt_token_ids) + list(req.completion_token_ids)], device=dev)
    lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    P, T = req.prompt_token_ids.size, req.completion_token_ids.size
    return (
        lp[P - 1 : P + T - 1]
        .gather(1, torch.from_numpy(req.completion_token_ids).to(dev)[:, None])[:, 0]
        .cpu()
        .numpy()
    )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(modes: dict, repeats: int) -> dict[str, float]:
    for fn in modes.values():
        fn()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for name, fn in modes.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {m: statistics.median(ts) for m, ts in times.items()}


def measure(model_dir: str, name: str, settings: dict, uniform, distill, ref, args, dev) -> dict:
    from transformers import AutoModelForCausalLM

    raw = (
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, settings["dtype"]))
        .to(dev)
        .eval()
    )
    off = load_engine(model_dir, device=args.device, prompt_cache_mb=0, **settings)
    on = load_engine(model_dir, device=args.device, **settings)
    if on.prompts is None:  # the engine reuses prompts on CPU devices only: forced here, to measure it
        from services.teacher.engine import flat_reuse
        from services.teacher.engine.prompt_kv import PromptLRU

        on.prompts = PromptLRU(256 * 1024 * 1024)
        on.flat_reuse = flat_reuse.install(on.model)  # reused completions in one packed pass, as on a CPU
    sec = timed(
        {
            "raw forward": lambda: run_raw(raw, uniform, args.batch_tokens, dev),
            "engine": lambda: off.score(uniform),
            "distill: engine, reuse off": lambda: off.score(distill),
            "distill: engine, reuse on": lambda: on.score(distill),
        },
        args.repeats,
    )
    pos = {m: scored_positions(distill if m.startswith("distill") else uniform) for m in sec}
    tok_s = {m: pos[m] / s for m, s in sec.items()}
    plain = [plain_logprobs(raw, r, dev) for r in uniform[:8]]
    mine = off.score(uniform[:8])
    exact = max(float(np.abs(p - m.token_logprobs).max()) for p, m in zip(plain, mine, strict=True))
    got, want = off.score(uniform), ref.score(uniform)
    diff = np.concatenate(
        [np.abs(a.token_logprobs - b.token_logprobs) for a, b in zip(got, want, strict=True)]
    )
    reused = on.score(distill)
    reuse_exact = max(
        float(np.abs(a.token_logprobs - b.token_logprobs).max())
        for a, b in zip(reused, off.score(distill), strict=True)
    )
    return {
        "dtype": name,
        "tok_s": tok_s,
        "engine_vs_raw": tok_s["engine"] / tok_s["raw forward"],
        "shared_prompt_speedup": tok_s["distill: engine, reuse on"] / tok_s["distill: engine, reuse off"],
        "max_abs_vs_plain_forward_same_dtype": exact,
        "reused_vs_computed_max_abs": reuse_exact,
        "error_vs_float32": {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="config.json + tokenizer files of the model to build")
    ap.add_argument("--out", help="JSON path")
    ap.add_argument(
        "--write-config", metavar="DIR", help="write SmolLM2's config + tokenizer to DIR and stop"
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--distill-prompts", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.write_config:
        write_config(Path(args.write_config))
        return
    if not (args.config and args.out):
        ap.error("--config and --out are required (or --write-config DIR)")
    dev = torch.device(args.device)
    model_dir = str(build_model(Path(args.config), Path("/tmp/gpu-check-model")))
    ref = load_engine(model_dir, device=args.device, prompt_cache_mb=0)
    uniform = uniform_requests(ref.tokenizer, args.sequences, 256, 32)
    distill = distillation_requests(ref.tokenizer, args.distill_prompts)
    out = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "uniform": f"{args.sequences} x 256 tokens, 32 prompt, top-20",
        "distill": f"{args.distill_prompts} prompts x 4 samples x 2 jobs",
        "records": [],
    }
    for name, settings in DTYPES.items():
        out["records"].append(measure(model_dir, name, settings, uniform, distill, ref, args, dev))
        print(json.dumps(out["records"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
