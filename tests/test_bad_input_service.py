"""Hostile input against one real teacher (front-end + worker, real Redis, real gRPC and HTTP over loopback):
schemathesis cases generated from the service's own OpenAPI schema (valid and invalid), malformed and oversize
protobuf messages on gRPC, Unicode edge cases and loose JSON types. Every case must get a 4xx (or a gRPC status
other than INTERNAL / UNKNOWN), and afterwards the service must still be healthy and exact. Case counts go to
tests/tally.py, printed at the end of the run."""

from __future__ import annotations

import json
import sys

import grpc
import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tally import TALLY
from teacher_proc import Teacher

from services.teacher import launch
from services.teacher.engine import load_engine
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.types import ScoreRequest

CASES = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
FINAL = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}  # what bad input must never get


@pytest.fixture(scope="module")
def teacher(tiny_teacher, tiny_student, redis_url, tmp_path_factory):
    """Started through the composition root with `--student`, so that the schema (and the cases generated from
    it) holds every route: the analysis routes /v1/compare and /v1/rescue too (tests/test_hostile_routes.py)."""
    flags = {"max-request-mb": "1", "student": str(tiny_student)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "CLI", [sys.executable, "-m", "services.app", "teacher"])
        with Teacher(tiny_teacher, redis_url, tmp_path_factory.mktemp("hostile"), flags=flags) as t:
            yield t


@pytest.fixture(scope="module")
def raw_score(teacher):
    """Score over gRPC with raw bytes in and out (no client-side checks in between)."""
    with grpc.insecure_channel(f"127.0.0.1:{teacher.grpc_port}") as ch:
        yield ch.unary_unary("/teacher.v1.Teacher/Score", request_serializer=None, response_deserializer=None)


def logprobs(teacher, body: str | bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.post(teacher.http + "/v1/logprobs", content=body, headers=headers, timeout=60)


def no_constant(name: str):
    raise AssertionError(f"{name} in a 200 response")


PER_ROUTE = {"post": 15, "get": 3}
"""Cases per operation and mode: a route of its own each, so that none goes untried (a route that takes a body
gets the most)."""


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_cases_from_the_services_own_schema(teacher, mode):
    schema = schemathesis.openapi.from_url(teacher.http + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/logprobs", "/v1/completions", "/v1/compare", "/v1/rescue"} <= {op.path for op in operations}
    for op in operations:
        if mode == "negative" and op.method.lower() == "get":
            continue  # no parameters to break (tests/test_hostile_routes.py)
        TALLY[f"schemathesis {mode}"] += check_route(teacher, op, mode)


def check_route(teacher, op, mode: str) -> int:
    """Runs `op`'s generated cases; every answer is below 500, and a 200 holds no NaN or Infinity."""
    tried = []

    @settings(CASES, max_examples=PER_ROUTE[op.method.lower()])
    @given(case=op.as_strategy(schemathesis.GenerationMode(mode)))
    def run(case):
        tried.append(1)
        response = case.call(base_url=teacher.http, timeout=60)
        assert response.status_code < 500 or case.path == "/healthz", (case.method, case.path, case.body)
        if response.status_code == 200 and "json" in response.headers.get("content-type", ""):
            json.loads(response.text, parse_constant=no_constant)  # no NaN / Infinity in an answer

    run()
    return len(tried)


VALID = pb.ScoreRequest(
    request_id="r", job_id="j", prompt_token_ids=[1, 2, 3], completion_token_ids=[4, 5]
).SerializeToString()


@st.composite
def mangled(draw) -> bytes:
    """A valid ScoreRequest's bytes, cut, flipped and spliced, or plain random bytes."""
    data = bytearray(draw(st.sampled_from([VALID, b""])))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
    return bytes(data) if data or draw(st.booleans()) else draw(st.binary(max_size=64))


def test_malformed_protobuf_bytes_on_grpc(raw_score):
    @CASES
    @given(raw=mangled())
    def run(raw):
        TALLY["gRPC malformed bytes"] += 1
        try:
            raw_score(raw, timeout=30)
        except grpc.RpcError as err:
            assert err.code() not in FINAL, (raw, err.code(), err.details())

    run()


def test_malformed_messages_on_a_stream_are_answered_in_band(teacher):
    garbage = [b"\xff\xff\xff", VALID, b"\x0a\x05ab", VALID[:-1], VALID]
    with grpc.insecure_channel(f"127.0.0.1:{teacher.grpc_port}") as ch:
        call = ch.stream_stream(
            "/teacher.v1.Teacher/ScoreStream", response_deserializer=pb.ScoreResponse.FromString
        )
        answers = list(call(iter(garbage), timeout=30))
    TALLY["gRPC malformed bytes"] += len(garbage)
    assert len(answers) == len(garbage)  # one answer each: the stream survives its bad messages
    codes = sorted(a.error.code for a in answers if a.HasField("error"))
    assert codes == ["INVALID_ARGUMENT"] * len(codes) and len(codes) >= 2


def test_oversize_messages_are_refused_before_they_are_read(teacher, raw_score):
    big = pb.ScoreRequest(job_id="j", prompt_token_ids=[300_000] * 600_000, completion_token_ids=[1])
    with pytest.raises(grpc.RpcError) as ei:
        raw_score(big.SerializeToString(), timeout=30)  # 1.8 MB, over --max-request-mb 1
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry-after-ms" not in dict(ei.value.trailing_metadata() or ())  # not worth retrying
    r = httpx.post(teacher.http + "/v1/logprobs", content=b"x" * (1024 * 1024 + 1), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    TALLY["oversize messages"] += 2


UNICODE = {
    "lone high surrogate": r'{"prompt": "\ud800", "completion": "b"}',
    "lone low surrogate": r'{"prompt": "a", "completion": "x\udfff"}',
    "reversed pair": r'{"prompt": "\ude00\ud83d", "completion": "b"}',
    "NUL": r'{"prompt": "a\u0000b", "completion": "\u0000"}',
    "only NUL": r'{"prompt": "\u0000", "completion": "\u0000\u0000"}',
    "BOM and zero-width": r'{"prompt": "\ufeff\u200b", "completion": "\u200d"}',
    "RTL and combining": '{"prompt": "\u05e9\u05dc\u05d5\u05dd e\u0301", "completion": "\u0627\u0644"}',
    "emoji pair": r'{"prompt": "\ud83d\ude00", "completion": "ok"}',
    "noncharacters": r'{"prompt": "\uffff\ufffe", "completion": "b"}',
    "200k characters": json.dumps({"prompt": "ab\u00e9 " * 50_000, "completion": "b"}),
    "200k-char completion": json.dumps({"prompt": "a", "completion": "\u4e2d" * 200_000}, ensure_ascii=False),
    "invalid UTF-8 bytes": b'{"prompt": "\xff\xfe", "completion": "b"}',
}


@pytest.mark.parametrize("name", list(UNICODE))
def test_unicode_edge_cases_are_never_a_server_error(teacher, name):
    TALLY["unicode"] += 1
    r = logprobs(teacher, UNICODE[name])
    assert r.status_code in (200, 400, 422), (r.status_code, r.text[:300])
    if "surrogate" in name or "reversed" in name:
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    if r.status_code != 200:
        assert r.json()["error"]["param"] in ("prompt", "completion", "completion_token_ids", "body")


LOOSE = [
    ({"top_k": "3"}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_k": 3.0}, "top_k"),
    ({"temperature": "1.0"}, "temperature"),
    ({"job_id": 7}, "job_id"),
    ({"prompt_token_ids": ["1"], "prompt": None}, "prompt_token_ids[0]"),
    ({"completion_token_ids": [True], "completion": None}, "completion_token_ids[0]"),
    ({"extra": 1}, "extra"),
]


@pytest.mark.parametrize(("change", "param"), LOOSE, ids=[p for _, p in LOOSE])
def test_loose_json_types_are_refused_like_grpc(teacher, change, param):
    TALLY["strict types"] += 1
    body = {k: v for k, v in {"prompt": "a", "completion": "b", **change}.items() if v is not None}
    r = logprobs(teacher, json.dumps(body))
    assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text


def test_the_service_is_healthy_and_exact_afterwards(teacher, tiny_teacher):
    """Runs last in this module: whatever came before, the teacher still answers, and answers right."""
    assert httpx.get(teacher.http + "/healthz", timeout=10).status_code == 200
    req = ScoreRequest([5, 6, 7], [8, 9], top_k=2)
    r = httpx.post(
        teacher.http + "/v1/logprobs",
        json={"prompt_token_ids": [5, 6, 7], "completion_token_ids": [8, 9], "top_k": 2},
    )
    assert r.status_code == 200
    expected = load_engine(str(tiny_teacher)).score_one(req)
    got = [t["logprob"] for t in r.json()["tokens"]]
    np.testing.assert_allclose(got, expected.token_logprobs, atol=1e-5)
    assert "Traceback" not in teacher.front.text()  # nothing reached the catch-all error log
