"""The vLLM dialect end to end: a real `teacher serve` process, real Redis, HTTP over loopback, a tiny real model,
checked against a plain transformers forward (tests/dialect_ref.py), and through the openai SDK."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from dialect_ref import check_entry, next_row, rank_of, reference_rows
from teacher_proc import Teacher

VOCAB = 512
NAME = "tiny-teacher"


@pytest.fixture(scope="module")
def teacher(tiny_teacher, redis_url, tmp_path_factory):
    flags = {"served-model-name": NAME}
    with Teacher(tiny_teacher, redis_url, tmp_path_factory.mktemp("dialect"), flags=flags) as t:
        yield t


def post(teacher, body: dict, **kw) -> httpx.Response:
    """POST as JSON with ASCII escapes (a lone surrogate travels as `\\ud800`, as a client would send it)."""
    return httpx.post(teacher.http + "/v1/completions", content=json.dumps(body), timeout=60, **kw)


def seqs(seed: int, n: int, lo: int = 2, hi: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def check_choice(
    model, choice: dict, ids: list[int], k: int, temperature: float = 1.0, start: int = 1
) -> None:
    rows = reference_rows(model, ids, temperature)
    got = choice["prompt_logprobs"]
    assert len(got) == len(ids) and all(e is None for e in got[:start])
    for i in range(start, len(ids)):
        check_entry(got[i], rows[i], ids[i], k)


def test_health_and_models(teacher):
    assert httpx.get(teacher.http + "/health").status_code == 200
    card = httpx.get(teacher.http + "/v1/models").json()["data"][0]
    assert card["id"] == NAME and card["object"] == "model" and card["max_model_len"] == card["max_context"]
    assert card["tokenizer_fingerprint"] and card["vocab_size"] == VOCAB  # what the project's trainer reads


@pytest.mark.parametrize(("k", "temperature"), [(0, 1.0), (1, 1.0), (8, 1.0), (5, 0.7)])
def test_prompt_logprobs_equal_a_plain_forward(teacher, tiny_teacher, k, temperature):
    prompts = seqs(k, 5) + [[17]]  # a prompt of one token: [null]
    r = post(teacher, {"prompt": prompts, "max_tokens": 1, "prompt_logprobs": k, "temperature": temperature})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == NAME
    assert [c["index"] for c in body["choices"]] == list(range(len(prompts)))
    for c, ids in zip(body["choices"], prompts, strict=True):
        check_choice(tiny_teacher, c, ids, k, temperature)
    assert body["choices"][-1]["prompt_logprobs"] == [None]
    assert (
        body["usage"]["prompt_tokens"] == sum(map(len, prompts)) and body["usage"]["completion_tokens"] == 6
    )


def test_shared_prefixes_are_exact_and_reused(teacher, tiny_teacher):
    """4 prompts x 4 samples sharing 40-token prompts, in one call and then one sequence per call: every value
    equals a plain forward, and usage counts the reused prompt tokens."""
    rng = np.random.default_rng(3)
    heads = seqs(30, 4, 40, 41)
    samples = [h + rng.integers(3, VOCAB, int(rng.integers(5, 30))).tolist() for h in heads for _ in range(4)]
    r = post(teacher, {"prompt": samples, "max_tokens": 1, "prompt_logprobs": 4}).json()
    for c, ids in zip(r["choices"], samples, strict=True):
        check_choice(tiny_teacher, c, ids, 4)
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= 12 * 32  # 3 of 4 samples reuse 32 tokens

    more = [h + rng.integers(3, VOCAB, 12).tolist() for h in heads for _ in range(2)]

    async def one_each():  # TRL's chunk_size=1: one sequence per call, concurrently
        async with httpx.AsyncClient(timeout=60) as c:
            calls = [
                c.post(teacher.http + "/v1/completions", json={"prompt": s, "prompt_logprobs": 4})
                for s in more
            ]
            return [x.json() for x in await asyncio.gather(*calls)]

    answers = asyncio.run(one_each())
    for a, ids in zip(answers, more, strict=True):
        check_choice(tiny_teacher, a["choices"][0], ids, 4)
    assert sum(a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers) >= 8 * 32


def test_whole_vocabulary_candidates_and_start(teacher, tiny_teacher):
    ids = seqs(5, 1, 12, 13)[0]
    rows = reference_rows(tiny_teacher, ids)
    full = post(teacher, {"prompt": ids, "max_tokens": 0, "prompt_logprobs": -1}).json()["choices"][0]
    assert all(len(e) == VOCAB for e in full["prompt_logprobs"][1:])
    check_choice(tiny_teacher, full, ids, VOCAB)
    cand = [[7, 9, -1], [11, 3, 4]] * 4 + [[5, 6, 8]]
    body = {"prompt": ids, "max_tokens": 0, "prompt_logprobs": 2, "prompt_logprob_start": 3}
    c = post(teacher, {**body, "prompt_logprob_token_ids": cand[:9]}).json()["choices"][0]
    check_choice(tiny_teacher, c, ids, 2, start=3)
    for t, (row_ids, got) in enumerate(zip(cand[:9], c["prompt_token_id_logprobs"], strict=True)):
        for i, v in zip(row_ids, got, strict=True):
            assert (v is None) if i < 0 else abs(v - rows[3 + t][i]) < 1e-4


def test_echo_and_generation(teacher, tiny_teacher):
    ids = seqs(6, 1, 8, 9)[0]
    rows = reference_rows(tiny_teacher, ids)
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2, "return_tokens_as_token_ids": True}
    echo = post(teacher, body).json()["choices"][0]
    lp = echo["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    assert all(abs(lp["token_logprobs"][i] - rows[i][ids[i]]) < 1e-4 for i in range(1, len(ids)))
    assert lp["tokens"] == [f"token_id:{i}" for i in ids]
    assert all(3 >= len(t) >= 2 for t in lp["top_logprobs"][1:])  # the actual token + the top 2
    assert lp["text_offset"] == list(np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]))
    greedy = post(
        teacher, {"prompt": ids, "max_tokens": 3, "temperature": 0, "logprobs": 1, "ignore_eos": True}
    )
    g = greedy.json()["choices"][0]
    expected, seq = [], list(ids)
    for _ in range(3):
        row = next_row(tiny_teacher, seq)
        expected.append(int(np.argmax(row)))
        seq.append(expected[-1])
    as_ids = post(
        teacher,
        {"prompt": ids, "max_tokens": 3, "temperature": 0, "return_token_ids": True, "ignore_eos": True},
    )
    assert as_ids.json()["choices"][0]["token_ids"] == expected
    assert g["finish_reason"] == "length" and len(g["logprobs"]["tokens"]) == 3
    row = next_row(tiny_teacher, ids)
    assert (
        abs(g["logprobs"]["token_logprobs"][0] - row[expected[0]]) < 1e-4 and rank_of(row, expected[0]) == 1
    )


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {"prompt_logprobs": 65},
            "prompt_logprobs",
            "Requested prompt logprobs of 65, which is greater than max allowed: 64",
        ),
        (
            {"logprobs": 100},
            "logprobs",
            "Requested sample logprobs of 100, which is greater than max allowed: 64",
        ),
        (
            {"prompt_logprobs": 2, "stream": True},
            "prompt_logprobs",
            "`prompt_logprobs` are not available when `stream=True`.",
        ),
        ({"prompt_logprobs": "3"}, "prompt_logprobs", "valid integer"),
        ({"prompt_logprobs": -2}, "prompt_logprobs", "positive value or -1"),
        ({"prompt": [1, 2, VOCAB]}, "prompt", "vocab_size"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": "\ud800"}, "prompt", "surrogate"),
        ({"temperature": -1}, "temperature", ">= 0"),
        ({"max_tokens": -1}, "max_tokens", "max_tokens"),
        ({"n": 2}, "n", "`n`"),
        ({"prompt": [5] * 1100}, "prompt", "maximum context length"),
        ({"prompt_logprob_token_ids": [[1]]}, "prompt_logprob_token_ids", "one non-empty row"),
        ({"user": "a b"}, "user", "`user`"),
    ],
)
def test_bad_fields_are_400s_naming_them(teacher, body, param, message):
    r = post(teacher, {"prompt": [5, 6, 7], "max_tokens": 1, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"] and err["code"] == 400
    assert err["type"] == "BadRequestError"


def test_model_name_unknown_keys_and_text(teacher, tiny_teacher):
    assert post(teacher, {"prompt": [5, 6], "model": "other"}).status_code == 404
    ok = post(
        teacher, {"prompt": "hello world", "model": NAME, "max_tokens": 0, "prompt_logprobs": 1, "foo": [1]}
    )
    assert ok.status_code == 200, ok.text
    assert (
        httpx.post(teacher.http + "/v1/completions", content=b"{", timeout=10).json()["error"]["param"]
        == "body"
    )


def test_openai_sdk(teacher, tiny_teacher):
    import openai

    client = openai.OpenAI(base_url=teacher.http + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [NAME]
    ids = seqs(9, 1, 10, 11)[0]
    out = client.completions.create(model=NAME, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 3})
    check_choice(tiny_teacher, out.choices[0].model_dump(), ids, 3)
    with pytest.raises(openai.BadRequestError, match="greater than max allowed"):
        client.completions.create(model=NAME, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 99})
