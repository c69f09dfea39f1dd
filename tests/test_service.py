"""The teacher service end to end: a real `prefix-distill teacher serve` process, real Redis, real gRPC and HTTP
over loopback, tiny real model. Results are compared with the engine run in this process."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest
from teacher_proc import Teacher, assert_invalid_argument, raw_stream, unary_score

from services.teacher.client import TeacherClient
from services.teacher.engine import load_engine
from services.teacher.errors import InvalidRequest
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.types import ScoreRequest, ScoreResult

VOCAB = 512


@pytest.fixture(scope="module")
def teacher(tiny_teacher, redis_url, tmp_path_factory):
    with Teacher(tiny_teacher, redis_url, tmp_path_factory.mktemp("svc"), flags={"stream-window": "32"}) as t:
        yield t


@pytest.fixture(scope="module")
def engine(tiny_teacher):
    return load_engine(str(tiny_teacher))


def random_requests(n: int, seed: int, jobs: int = 1, **kw) -> list[ScoreRequest]:
    rng = np.random.default_rng(seed)
    return [
        ScoreRequest(
            rng.integers(0, VOCAB, int(rng.integers(1, 40))),
            rng.integers(0, VOCAB, int(rng.integers(1, 30))),
            request_id=f"req-{seed}-{i}",
            job_id=f"job-{i % jobs}",
            **kw,
        )
        for i in range(n)
    ]


def assert_same(a: ScoreResult, b: ScoreResult) -> None:
    np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5, rtol=0)
    if b.top_k_ids is not None:
        np.testing.assert_array_equal(a.top_k_ids, b.top_k_ids)
        np.testing.assert_allclose(a.top_k_logprobs, b.top_k_logprobs, atol=1e-5, rtol=0)
    if b.full_logprobs is not None:
        np.testing.assert_allclose(a.full_float32(), b.full_float32(), atol=1e-5, rtol=0)


def test_grpc_equals_engine(teacher, engine):
    reqs = random_requests(12, 0, top_k=5, temperature=0.8)
    reqs[3].full = True
    reqs[4].full, reqs[4].full_dtype = True, "bfloat16"
    expected = engine.score(reqs)

    async def go():
        async with TeacherClient(teacher.target) as c:
            one = await c.score(reqs[0])
            many = await c.score_many(reqs)
            return one, many

    one, many = asyncio.run(go())
    assert_same(one, expected[0])
    for got, exp, req in zip(many, expected, reqs, strict=True):
        assert got.request_id == req.request_id
        assert_same(got, exp)
    assert many[4].full_dtype == "bfloat16" and many[4].full_logprobs.dtype == np.uint16


def test_large_full_rows_equal_engine(teacher, engine):
    """Full rows above the inline reply size (600 x 512 float32 = 1.2 MB) travel under their own Redis key and
    come back equal to the engine's, beside small requests of the same batch answered first."""
    reqs = random_requests(4, 7, top_k=3)
    rng = np.random.default_rng(7)
    reqs[1] = ScoreRequest(
        rng.integers(0, VOCAB, 9), rng.integers(0, VOCAB, 600), request_id="big", job_id="job-0", full=True
    )
    expected = engine.score(reqs)

    async def go():
        async with TeacherClient(teacher.target) as c:
            return await c.score_many(reqs)

    for got, exp in zip(asyncio.run(go()), expected, strict=True):
        assert got.request_id == exp.request_id
        assert_same(got, exp)


def test_http_equals_engine(teacher, engine):
    tok = engine.tokenizer
    body = {"prompt": "Question: what is 3 + 4?", "completion": " Answer: 7.", "top_k": 3, "temperature": 1.5}
    r = httpx.post(teacher.http + "/v1/logprobs", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    p = tok(body["prompt"], add_special_tokens=False)["input_ids"]
    c = tok(body["completion"], add_special_tokens=False)["input_ids"]
    exp = engine.score_one(ScoreRequest(p, c, top_k=3, temperature=1.5))
    assert out["prompt_token_ids"] == p
    assert [t["token_id"] for t in out["tokens"]] == c
    np.testing.assert_allclose([t["logprob"] for t in out["tokens"]], exp.token_logprobs, atol=1e-5)
    for t, ids, lps in zip(out["tokens"], exp.top_k_ids, exp.top_k_logprobs, strict=True):
        assert [x["token_id"] for x in t["top"]] == ids.tolist()
        np.testing.assert_allclose([x["logprob"] for x in t["top"]], lps, atol=1e-5)
        assert [x["logprob"] for x in t["top"]] == sorted((x["logprob"] for x in t["top"]), reverse=True)
    # ids in, same numbers out
    r2 = httpx.post(
        teacher.http + "/v1/logprobs",
        json={"prompt_token_ids": p, "completion_token_ids": c, "top_k": 3, "temperature": 1.5},
        timeout=30,
    )
    # (the second call reuses the prompt's keys/values: equal to float32 rounding, engine/prompt_kv.py)
    again = r2.json()["tokens"]
    assert [t["token_id"] for t in again] == c
    np.testing.assert_allclose(
        [t["logprob"] for t in again], [t["logprob"] for t in out["tokens"]], atol=1e-5
    )
    assert [[x["token_id"] for x in t["top"]] for t in again] == [
        [x["token_id"] for x in t["top"]] for t in out["tokens"]
    ]


def test_model_info_and_health(teacher, engine, tiny_teacher):
    from transformers import AutoModelForCausalLM

    async def go():
        async with TeacherClient(teacher.target) as c:
            await c.wait_ready(10)
            return await c.model_info()

    info = asyncio.run(go())
    assert info.tokenizer_fingerprint == engine.info.tokenizer_fingerprint
    assert info.vocab_size == VOCAB and info.backend == "hf"
    # FLOP sizes travel with the model info: counted independently from freshly loaded weights here
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    layers = model.get_decoder().layers
    assert info.flop_dims == {
        "n_layer": len(layers),
        "d_attn": model.config.num_attention_heads * model.config.head_dim,
        "layer_params": sum(p.numel() for n, p in layers.named_parameters() if "norm" not in n),
        "head_params": model.lm_head.weight.numel(),
    }
    m = httpx.get(teacher.http + "/v1/models").json()["data"][0]
    assert m["tokenizer_fingerprint"] == info.tokenizer_fingerprint
    h = httpx.get(teacher.http + "/healthz").json()
    assert h["status"] == "ok" and h["workers"] == 1
    assert httpx.get(teacher.http + "/docs").status_code == 200
    assert "/v1/logprobs" in httpx.get(teacher.http + "/openapi.json").json()["paths"]


def test_reflection_lists_the_service(teacher):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{teacher.grpc_port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        names = {s.name for s in resp.list_services_response.service}
    assert {"teacher.v1.Teacher", "grpc.health.v1.Health"} <= names


def test_stream_200_requests_from_3_jobs_each_answered_once(teacher, engine):
    """Three concurrent jobs stream 200 requests of mixed sizes; every response arrives exactly once."""
    per_job = [random_requests(67, 100 + j, top_k=2) for j in range(3)]
    for j, reqs in enumerate(per_job):
        for r in reqs:
            r.job_id = f"stream-job-{j}"

    async def go():
        return await asyncio.gather(*(raw_stream(teacher.grpc_port, r) for r in per_job))

    outs = asyncio.run(go())
    total = 0
    for reqs, (counts, got) in zip(per_job, outs, strict=True):
        assert set(counts) == {r.request_id for r in reqs}
        assert set(counts.values()) == {1}
        expected = engine.score(reqs)
        for r, e in zip(reqs, expected, strict=True):
            assert_same(got[r.request_id], e)
        total += len(counts)
    assert total == 201 >= 200


def test_stream_flow_control_bounds_in_flight(teacher):
    """A client that writes 2,000 requests and does not read cannot make the server hold more than the window."""
    import re

    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{teacher.grpc_port}") as ch:
            reqs = [r.to_pb() for r in random_requests(2000, 7, top_k=1)]
            call = ch.stream_stream(
                "/teacher.v1.Teacher/ScoreStream",
                request_serializer=pb.ScoreRequest.SerializeToString,
                response_deserializer=pb.ScoreResponse.FromString,
            )(iter(reqs))
            peak = 0
            for _ in range(15):
                await asyncio.sleep(0.1)
                text = httpx.get(teacher.http + "/metrics").text
                m = re.search(r"^teacher_frontend_pending (\S+)$", text, re.M)
                peak = max(peak, float(m.group(1)))
            n = 0
            async for _ in call:
                n += 1
            return peak, n

    peak, n = asyncio.run(go())
    assert n == 2000
    assert 0 < peak <= 32  # --stream-window 32


BAD_GRPC = [
    (dict(prompt_token_ids=[1], completion_token_ids=[]), "completion_token_ids"),
    (dict(prompt_token_ids=[], completion_token_ids=[1]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1], completion_token_ids=[VOCAB]), "completion_token_ids"),
    (dict(prompt_token_ids=[-3], completion_token_ids=[1]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1] * 1100, completion_token_ids=[1]), "completion_token_ids"),
    (dict(prompt_token_ids=[1], completion_token_ids=[1], top_k=-1), "top_k"),
    (dict(prompt_token_ids=[1], completion_token_ids=[1], top_k=65), "top_k"),
    (dict(prompt_token_ids=[1], completion_token_ids=[1], temperature=-1.0), "temperature"),
    (dict(prompt_token_ids=[1], completion_token_ids=[1], temperature=float("nan")), "temperature"),
    (dict(prompt_token_ids=[1], completion_token_ids=[1], full=True, full_dtype=pb.INT32), "full_dtype"),
    (dict(prompt_token_ids=[1], completion_token_ids=[1], full=True, full_dtype=99), "full_dtype"),
]


@pytest.mark.parametrize("fields,param", BAD_GRPC, ids=[p for _, p in BAD_GRPC])
def test_bad_input_grpc(teacher, fields, param):
    with grpc.insecure_channel(f"127.0.0.1:{teacher.grpc_port}") as ch:
        score = unary_score(ch)
        with pytest.raises(grpc.RpcError) as ei:
            score(pb.ScoreRequest(request_id="bad", **fields), timeout=10)
        assert_invalid_argument(ei.value, param)
        # the stream reports it in-band and goes on with the next request
        stream = ch.stream_stream(
            "/teacher.v1.Teacher/ScoreStream",
            request_serializer=pb.ScoreRequest.SerializeToString,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        good = pb.ScoreRequest(request_id="good", prompt_token_ids=[1, 2], completion_token_ids=[3])
        resps = {r.request_id: r for r in stream(iter([pb.ScoreRequest(request_id="bad", **fields), good]))}
        assert resps["bad"].error.code == "INVALID_ARGUMENT" and resps["bad"].error.param == param
        assert not resps["good"].HasField("error")


def test_garbage_bytes_grpc(teacher):
    with grpc.insecure_channel(f"127.0.0.1:{teacher.grpc_port}") as ch:
        raw = ch.unary_unary(
            "/teacher.v1.Teacher/Score", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as ei:
            raw(b"\xff\xff\xff\xff not a protobuf", timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_client_raises_invalid_request_with_field(teacher):
    async def go():
        async with TeacherClient(teacher.target) as c:
            await c.score_many([ScoreRequest([1], [2]), ScoreRequest([1], [2], top_k=1000)])

    with pytest.raises(InvalidRequest) as ei:
        asyncio.run(go())
    assert ei.value.param == "top_k"


BAD_HTTP = [
    ({"completion": "x"}, 400, "prompt"),
    ({"prompt": "x", "prompt_token_ids": [1], "completion": "y"}, 400, "prompt"),
    ({"prompt": "x"}, 400, "completion"),
    ({"prompt": "x", "completion": ""}, 400, "completion"),
    ({"prompt": "", "completion": "y"}, 400, "prompt"),
    ({"prompt": "x", "completion_token_ids": []}, 400, "completion_token_ids"),
    ({"prompt": "x", "completion_token_ids": [1, VOCAB]}, 400, "completion_token_ids"),
    ({"prompt_token_ids": [-1], "completion": "y"}, 400, "prompt_token_ids"),
    ({"prompt": "x", "completion": "y", "top_k": 1000}, 400, "top_k"),
    ({"prompt": "x", "completion": "y", "top_k": -2}, 400, "top_k"),
    ({"prompt": "x", "completion": "y", "temperature": 0}, 400, "temperature"),
    ({"prompt": "x", "completion": "y", "top_k": "many"}, 422, "top_k"),
    ({"prompt": "x", "completion_token_ids": [1, "a"]}, 422, "completion_token_ids[1]"),
    ({"prompt": "x", "completion": "y", "surprise": 1}, 422, "surprise"),
    ({"prompt": "x", "completion_token_ids": [10**30]}, 400, "completion_token_ids"),
]


@pytest.mark.parametrize("body,status,param", BAD_HTTP, ids=[f"{s}-{p}" for _, s, p in BAD_HTTP])
def test_bad_input_http(teacher, body, status, param):
    r = httpx.post(teacher.http + "/v1/logprobs", json=body, timeout=10)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]


def test_malformed_http_bodies(teacher):
    for content in (b"garbage", b"", b"[1, 2]", b'{"prompt": '):
        r = httpx.post(
            teacher.http + "/v1/logprobs", content=content, headers={"content-type": "application/json"}
        )
        assert r.status_code == 422 and "error" in r.json(), (content, r.text)
    # and the service is still up and right
    ok = httpx.post(teacher.http + "/v1/logprobs", json={"prompt": "a", "completion": "b"}, timeout=30)
    assert ok.status_code == 200


def _http_invalid_count(teacher) -> float:
    import re

    text = httpx.get(teacher.http + "/metrics").text
    m = re.search(r'^teacher_requests_total\{code="INVALID_ARGUMENT",transport="http"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_errors_are_counted_by_code(teacher):
    before = _http_invalid_count(teacher)
    httpx.post(teacher.http + "/v1/logprobs", json={"prompt": "x"})  # 400 before queueing
    httpx.post(
        teacher.http + "/v1/logprobs", content=b"garbage", headers={"content-type": "application/json"}
    )
    httpx.post(
        teacher.http + "/v1/logprobs", json={"prompt": "x", "completion": "y", "top_k": 999}
    )  # 400 at submit
    assert _http_invalid_count(teacher) - before == 3


def test_metrics_exposed(teacher):
    text = httpx.get(teacher.http + "/metrics").text
    for name in (
        "teacher_requests_total",
        "teacher_request_latency_seconds_bucket",
        "teacher_batch_size_bucket",
        "teacher_tokens_scored_total",
        "teacher_tokens_per_second",
        "teacher_live_workers",
    ):
        assert name in text, name
    assert 'code="INVALID_ARGUMENT"' in text


def test_a_burst_sharing_prompts_is_claimed_by_what_the_worker_computes(
    tiny_teacher, redis_url, tmp_path, engine
):
    """24 requests on 2 prompts of 60 tokens, 10 completion tokens each, budget 400: the padded rule takes at
    most 5 a batch (5 x 70); the worker computes each prompt once, so 2 x 70 + 22 x 10 = 360 fit one batch. The
    answers still equal the engine's (a plain pass, a token budget of the default)."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, VOCAB, 60) for _ in range(2)]
    reqs = [
        ScoreRequest(prompts[i % 2], rng.integers(0, VOCAB, 10), request_id=f"s{i}", top_k=3)
        for i in range(24)
    ]
    flags = {"max-batch-tokens": "400", "batch-wait-ms": "100", "batch-wait-max-ms": "2000"}
    with Teacher(tiny_teacher, redis_url, tmp_path, flags=flags | {"namespace": "burst"}) as t:

        async def go():
            async with TeacherClient(t.target) as c:
                return await c.score_many(reqs)

        got = asyncio.run(go())
    assert max(r.batch_size for r in got) > 5, [r.batch_size for r in got]
    assert sum(r.prompt_tokens_reused for r in got) >= 22 * 60
    for g, e in zip(got, engine.score(reqs), strict=True):
        assert_same(g, e)
