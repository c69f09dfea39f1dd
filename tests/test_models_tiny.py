"""`prefix-distill models tiny`: a tiny random Llama with a local tokenizer; seeds change weights only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.teacher.modelinfo import tokenizer_fingerprint


def run_tiny(*calls: tuple[Path, list[str]]) -> list[subprocess.CompletedProcess]:
    """Runs `prefix-distill models tiny OUT ARGS...` for each call, concurrently (start-up is ~4 s each)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "services.app", "models", "tiny", str(out), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"},
        )
        for out, args in calls
    ]
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def test_tiny_cli_seeds(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--layers", "3", "--hidden", "32"]
    for out, proc in zip(
        (a, b), run_tiny((a, [*common, "--seed", "0"]), (b, [*common, "--seed", "1"])), strict=True
    ):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(out)
        assert proc.stderr == "", "progress bars must stay off the CLI's stderr"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if not torch.equal(wa[k], wb[k]) and "norm" not in k]
    assert len(differing) == len([k for k in wa if "norm" not in k]), "every random weight must differ"

    model = AutoModelForCausalLM.from_pretrained(a)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (3, 32)
    tok_a, tok_b = AutoTokenizer.from_pretrained(a), AutoTokenizer.from_pretrained(b)
    assert tokenizer_fingerprint(tok_a) == tokenizer_fingerprint(tok_b)
    assert cfg.vocab_size == len(tok_a)
    # The tokenizer round-trips the kind of text the tests use, without unknown tokens.
    text = "Question: what is 12 + 7? Answer: 19."
    ids = tok_a(text, add_special_tokens=False)["input_ids"]
    assert tok_a.decode(ids) == text and tok_a.unk_token_id not in ids
    # The model runs: logits over the whole vocabulary.
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), cfg.vocab_size) and torch.isfinite(logits).all()


def test_same_seed_same_weights(tmp_path):
    from services.models.tiny import build_tiny

    a = build_tiny(tmp_path / "a", layers=1, hidden=32, seed=5)
    b = build_tiny(tmp_path / "b", layers=1, hidden=32, seed=5)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
