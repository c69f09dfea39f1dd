"""`prefix-distill score`: the real console script in a subprocess, checked against the DESIGN.md contract and
an independent transformers forward pass; bad arguments exit non-zero with a one-line error naming the field.

Each subprocess pays ~4 s of imports, so three run (at once, in a module fixture): two successes and one bad
argument. The other bad arguments go through the same typer app in-process (CliRunner), which is just as real
but costs no start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TOL = 1e-4
PROMPT, COMPLETION = "Question: what is 12 + 7?", " Answer: 19."


def cli() -> list[str]:
    """The installed console script next to this interpreter, else the module entry point."""
    exe = Path(sys.executable).parent / "prefix-distill"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("prefix-distill")
    return [found] if found else [sys.executable, "-m", "services.app"]


def user_env() -> dict:
    """The environment a user has: without the test session's progress-bar / verbosity switches."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")
    }
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def runs(tiny_teacher) -> dict[str, subprocess.CompletedProcess]:
    """name -> finished `prefix-distill score` process."""
    base = ["score", "--model", str(tiny_teacher)]
    cases = {
        "text": [
            *base,
            "--prompt",
            PROMPT,
            "--completion",
            COMPLETION,
            "--top-k",
            "5",
            "--temperature",
            "0.8",
        ],
        "ids": [*base, "--prompt-ids", "3,17,42", "--completion-ids", "7, 99,250,0", "--top-k", "3"],
        "bad_top_k": [*base, "--prompt", PROMPT, "--completion", COMPLETION, "--top-k", "-1"],
    }
    procs = {
        name: subprocess.Popen(
            cli() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=user_env()
        )
        for name, args in cases.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def reference(tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_teacher)


def reference_rows(model, prompt_ids, completion_ids, temperature=1.0) -> np.ndarray:
    """(T, V) float32 log-probabilities of one unpadded transformers forward pass."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    P, T = len(prompt_ids), len(completion_ids)
    return torch.log_softmax(logits[P - 1 : P + T - 1] / temperature, dim=-1).numpy()


def check_body(body: dict, model_path, tok, model, prompt_ids, completion_ids, top_k, temperature) -> float:
    """Asserts the DESIGN.md response contract and the numbers; returns the max abs diff."""
    assert set(body) == {"model", "prompt_token_ids", "tokens"}
    assert body["model"] == str(model_path)
    assert body["prompt_token_ids"] == prompt_ids
    assert len(body["tokens"]) == len(completion_ids)
    rows = reference_rows(model, prompt_ids, completion_ids, temperature)
    worst = 0.0
    for t, entry in enumerate(body["tokens"]):
        assert set(entry) == {"token_id", "token", "logprob", "top"}
        assert entry["token_id"] == completion_ids[t]
        assert entry["token"] == tok.decode([completion_ids[t]])
        worst = max(worst, abs(entry["logprob"] - rows[t, completion_ids[t]]))
        assert len(entry["top"]) == top_k
        lps = [e["logprob"] for e in entry["top"]]
        assert lps == sorted(lps, reverse=True), "`top` must be sorted by logprob, descending"
        ref_top = np.sort(rows[t])[::-1][:top_k]
        for e, ref_lp in zip(entry["top"], ref_top, strict=True):
            assert set(e) == {"token_id", "token", "logprob"}
            assert isinstance(e["token_id"], int) and e["token"] == tok.decode([e["token_id"]])
            worst = max(worst, abs(e["logprob"] - ref_lp), abs(rows[t, e["token_id"]] - ref_lp))
    assert worst <= TOL, f"max abs diff {worst:.3g} vs transformers"
    return worst


def test_score_text(runs, reference, tiny_teacher):
    proc = runs["text"]
    assert proc.returncode == 0, proc.stderr
    model, tok = reference
    body = json.loads(proc.stdout)
    assert proc.stdout.count("\n") == 1, "exactly one JSON document on stdout"
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    completion_ids = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    assert len(completion_ids) > 1
    worst = check_body(body, tiny_teacher, tok, model, prompt_ids, completion_ids, 5, 0.8)
    print(f"score --prompt/--completion: max abs diff {worst:.3g}")


def test_score_ids(runs, reference, tiny_teacher):
    proc = runs["ids"]
    assert proc.returncode == 0, proc.stderr
    model, tok = reference
    worst = check_body(
        json.loads(proc.stdout), tiny_teacher, tok, model, [3, 17, 42], [7, 99, 250, 0], 3, 1.0
    )
    print(f"score --prompt-ids/--completion-ids: max abs diff {worst:.3g}")


def run_in_process(args: list[str]):
    """The same typer app, in this process; stdout and stderr captured apart."""
    from typer.testing import CliRunner

    from services.app.cli import app

    return CliRunner().invoke(app, args)


def test_score_without_top_k(reference, tiny_teacher):
    result = run_in_process(
        ["score", "--model", str(tiny_teacher), "--prompt-ids", "5", "--completion-ids", "6"]
    )
    assert result.exit_code == 0, result.stderr
    model, tok = reference
    body = json.loads(result.stdout)
    check_body(body, tiny_teacher, tok, model, [5], [6], 0, 1.0)
    assert body["tokens"][0]["top"] == []


@pytest.mark.parametrize("name", ["text", "ids"])
def test_quiet_stderr(runs, name):
    """No "Loading weights" progress bars (or anything else) on stderr for a successful score."""
    assert "Loading weights" not in runs[name].stderr
    assert runs[name].stderr == ""


def assert_one_line_error(exit_code: int, stdout: str, stderr: str, param: str, fragment: str) -> None:
    assert exit_code != 0
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"one-line error expected, got:\n{stderr}"
    assert lines[0].startswith(f"error: {param}: "), lines[0]
    assert fragment in lines[0] and "Traceback" not in stderr


def test_bad_top_k_console_script(runs):
    proc = runs["bad_top_k"]
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "top_k", "`top_k` must be >= 0, got -1.")


@pytest.mark.parametrize(
    "args, param, fragment",
    [
        (["--prompt-ids", "1,2", "--completion-ids", "3,512"], "completion_token_ids", "vocab_size 512"),
        (["--prompt-ids", "1,2", "--completion-ids", "3,-4"], "completion_token_ids", ">= 0"),
        (["--prompt", PROMPT], "completion", "`completion_token_ids`"),
        (["--prompt", PROMPT, "--prompt-ids", "1", "--completion", "x"], "prompt", "exactly one"),
        (["--prompt", PROMPT, "--completion", COMPLETION, "--temperature", "0"], "temperature", "> 0"),
        (["--prompt", PROMPT, "--completion", COMPLETION, "--top-k", "100"], "top_k", "<= 64"),
        (["--prompt-ids", "1,x", "--completion-ids", "2"], "prompt_token_ids", "'1,x'"),
        (["--prompt-ids", "1", "--completion-ids", ""], "completion_token_ids", "at least one"),
    ],
)
def test_bad_arguments(tiny_teacher, args, param, fragment):
    result = run_in_process(["score", "--model", str(tiny_teacher), *args])
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, param, fragment)


def test_missing_model(tmp_path):
    result = run_in_process(
        ["score", "--model", str(tmp_path / "nope"), "--prompt-ids", "1", "--completion-ids", "2"]
    )
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, "model", "")
