"""Numeric edge values in every numeric field, against one real teacher (front-end + worker, real Redis):
0, -0.0, denormals, the int32 / int64 / uint64 edges, NaN, +-inf and huge floats, over gRPC (ScoreRequest bytes
written by hand, so that any value reaches any field, past what a protobuf library would let a client set) and
over HTTP JSON (/v1/logprobs and the vLLM dialect's /v1/completions, with `NaN`, `Infinity` and `1e400` sent as
raw tokens). Property: a refusal names the field (never INTERNAL / UNKNOWN / 5xx); an answer has finite
logprobs of the ids sent, at the temperature sent (checked against a plain transformers forward for a few
fixed cases): no input is accepted and silently scored as something else. Case counts go to tests/tally.py."""

from __future__ import annotations

import json
import math
import struct

import grpc
import httpx
import numpy as np
import pytest
from dialect_ref import reference_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tally import TALLY
from teacher_proc import Teacher

from services.teacher.pb.teacher.v1 import teacher_pb2 as pb

CASES = settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
FINAL = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
INTS = [0, 1, -1, 7, 2**31 - 1, 2**31, -(2**31), 2**32 + 5, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
FLOATS = [0.0, -0.0, 1e-320, 1.4e-45, 5e-324, 1e-7, 1e-6, 0.37, 1e6, 1.1e6, 3.4e38, 1e39, math.nan, math.inf]
FLOATS += [-math.inf, -1.0]
FIELD_NO = {"prompt_token_ids": 3, "completion_token_ids": 4, "top_k": 5, "temperature": 7, "full_dtype": 8}
FIELD_NO |= {"timeout_ms": 9, "candidate_ids": 10, "num_candidates": 11, "seed": 15}
PAIRED = {"candidate_ids", "num_candidates"}
"""Either may be named when the other is off: the ids must fill completion positions x num_candidates."""


@pytest.fixture(scope="module")
def teacher(tiny_teacher, redis_url, tmp_path_factory):
    with Teacher(tiny_teacher, redis_url, tmp_path_factory.mktemp("numbers")) as t:
        yield t


@pytest.fixture(scope="module")
def vocab(teacher) -> int:
    return httpx.get(teacher.http + "/v1/models", timeout=10).json()["data"][0]["vocab_size"]


@pytest.fixture(scope="module")
def raw_score(teacher):
    with grpc.insecure_channel(f"127.0.0.1:{teacher.grpc_port}") as ch:
        yield ch.unary_unary("/teacher.v1.Teacher/Score", request_serializer=None, response_deserializer=None)


def varint(n: int) -> bytes:
    n &= 2**64 - 1  # as a 64-bit two's complement, the way every protobuf encoder writes a negative int
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def encode(fields: dict) -> bytes:
    """ScoreRequest bytes, by hand: every integer as a varint of its 64 bits, repeated fields unpacked (legal),
    the temperature as the float32 it becomes on the wire."""
    out = bytearray(b"\x12\x01j")  # job_id "j"
    for name, value in fields.items():
        no = FIELD_NO[name]
        if name == "temperature":
            out += bytes([no << 3 | 5]) + struct.pack("<f", np.float32(value))
        else:
            for v in value if isinstance(value, list) else [value]:
                out += bytes([no << 3]) + varint(v)
    return bytes(out)


@st.composite
def edge_requests(draw) -> dict:
    """A valid request (prompt [1, 2, 3], completion [4, 5]) with one to three fields set to edge values."""
    fields = {"prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 5]}
    for name in draw(st.lists(st.sampled_from(sorted(FIELD_NO)), min_size=1, max_size=3, unique=True)):
        if name == "temperature":
            fields[name] = draw(st.sampled_from(FLOATS))
        elif name in ("prompt_token_ids", "completion_token_ids", "candidate_ids"):
            ids = list(fields.get(name, [4, 5]))
            ids[draw(st.integers(0, len(ids) - 1))] = draw(st.sampled_from(INTS))
            fields[name] = ids
        else:
            fields[name] = draw(st.sampled_from(INTS))
    return fields


def wire_value(name: str, v):
    """What a field holds once parsed: int32 fields keep the low 32 bits, int64 the low 64 (signed)."""
    if name == "temperature":
        return float(np.float32(v))
    bits = 64 if name in ("timeout_ms", "seed") else 32
    v &= 2**bits - 1
    return v - 2**bits if v >= 2 ** (bits - 1) else v


def test_numeric_edges_over_grpc(raw_score, vocab):
    @CASES
    @given(fields=edge_requests())
    def run(fields):
        TALLY["numeric edges (gRPC)"] += 1
        try:
            raw = raw_score(encode(fields), timeout=30)
        except grpc.RpcError as err:
            assert err.code() not in FINAL, (fields, err.code(), err.details())
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                param = dict(err.trailing_metadata() or ())["x-error-param"]
                named = set(fields) | ({"candidate_ids", "num_candidates"} if PAIRED & set(fields) else set())
                assert param in named and f"`{param}`" in err.details(), (fields, err.details())
            return
        resp = pb.ScoreResponse.FromString(raw)
        lp = np.frombuffer(resp.token_logprobs.data, np.float32)
        assert lp.shape == (len(fields["completion_token_ids"]),) and np.all(np.isfinite(lp)), fields
        assert np.all(lp <= 0), fields
        for name in ("prompt_token_ids", "completion_token_ids", "candidate_ids"):
            for v in fields.get(name, []):  # accepted: the id sent is the id scored
                assert 0 <= v < vocab and wire_value(name, v) == v, (name, v)
        for name in ("top_k", "timeout_ms", "num_candidates", "seed", "full_dtype"):
            if name in fields:
                assert wire_value(name, fields[name]) == fields[name] >= 0, (name, fields[name])
        if "temperature" in fields:
            t = wire_value("temperature", fields["temperature"])
            assert np.float32(1e-6) <= t <= 1e6, fields  # sent, so present: an explicit 0 is refused too

    run()


EXACT = [([1, 2, 3], [4, 5], 1e-6), ([0, 2], [0, 9], 1e6), ([5, 6, 7], [8, 9], 0.37), ([3], [1], 1.0)]


@pytest.mark.parametrize(("prompt", "completion", "temperature"), EXACT)
def test_an_accepted_temperature_is_the_temperature_scored(
    teacher, raw_score, tiny_teacher, prompt, completion, temperature
):
    """Over gRPC and over HTTP: the logprobs of a plain transformers forward at the temperature sent."""
    TALLY["numeric edges (exact)"] += 1
    fields = {"prompt_token_ids": prompt, "completion_token_ids": completion, "temperature": temperature}
    lp = np.frombuffer(
        pb.ScoreResponse.FromString(raw_score(encode(fields), timeout=30)).token_logprobs.data, np.float32
    )
    rows = reference_rows(tiny_teacher, prompt + completion, temperature)[len(prompt) :]
    expected = rows[np.arange(len(completion)), completion]
    np.testing.assert_allclose(lp, expected, rtol=1e-4, atol=1e-4)
    body = {"prompt_token_ids": prompt, "completion_token_ids": completion, "temperature": temperature}
    got = httpx.post(teacher.http + "/v1/logprobs", json=body, timeout=30).json()
    np.testing.assert_allclose([t["logprob"] for t in got["tokens"]], expected, rtol=1e-4, atol=1e-4)


INT_TOKENS = ["0", "-0", "-1", "7", "2147483647", "2147483648", "4294967301", "9223372036854775807"]
INT_TOKENS += ["9223372036854775808", "18446744073709551615", "-9223372036854775809", "1e2", "7.0"]
FLOAT_TOKENS = ["0", "0.0", "-0.0", "1e-320", "1.4e-45", "5e-324", "1e-7", "1e-6", "0.37", "1e6", "1.1e6"]
FLOAT_TOKENS += ["3.4e38", "1e39", "1e400", "-1e400", "NaN", "Infinity", "-Infinity", "-1", "1"]
LOGPROBS_BODY = (
    '{"prompt_token_ids": [1, %(p)s, 3], "completion_token_ids": [4, %(c)s], "top_k": %(top_k)s, '
    '"temperature": %(temperature)s, "candidate_ids": [[%(cand)s], [6]]}'
)
LOGPROBS_FIELDS = {
    "p": "prompt_token_ids",
    "c": "completion_token_ids",
    "top_k": "top_k",
    "cand": "candidate_ids",
}
COMPLETIONS_BODY = (
    '{"prompt": [1, %(p)s, 3, 4], "max_tokens": %(max_tokens)s, "prompt_logprobs": %(prompt_logprobs)s, '
    '"logprobs": %(logprobs)s, "n": %(n)s, "seed": %(seed)s, "temperature": %(temperature)s, '
    '"return_token_ids": true}'
)
COMPLETIONS_FIELDS = {"p": "prompt", "max_tokens": "max_tokens", "prompt_logprobs": "prompt_logprobs"}
COMPLETIONS_FIELDS |= {"logprobs": "logprobs", "n": "n", "seed": "seed"}
DEFAULTS = {"p": "2", "c": "5", "top_k": "2", "temperature": "1.0", "cand": "7", "max_tokens": "1"}
DEFAULTS |= {"prompt_logprobs": "2", "logprobs": "1", "n": "1", "seed": "3"}


def no_constant(name: str):
    raise AssertionError(f"{name} in a 200 response")


def hostile_bodies(template: str, fields: dict) -> list[tuple[str, str, str]]:
    """(field, token, body): every integer field with every integer edge, the temperature with every float."""
    out = [(f, tok, template % {**DEFAULTS, key: tok}) for key, f in fields.items() for tok in INT_TOKENS]
    return out + [("temperature", tok, template % {**DEFAULTS, "temperature": tok}) for tok in FLOAT_TOKENS]


def post(teacher, path: str, body: str) -> httpx.Response:
    return httpx.post(
        teacher.http + path, content=body, headers={"content-type": "application/json"}, timeout=30
    )


def refused_by_name(r: httpx.Response, field: str) -> bool:
    return r.status_code in (400, 422) and r.json()["error"]["param"].split("[")[0] == field


def edge_failures(teacher, path: str, bodies, unchanged) -> list[tuple]:
    """POST each hostile body to `path`: a refusal must name its field; an answer (parsed with NaN and Infinity
    refused) must pass `unchanged(answer, sent, field, value)`. Returns what did neither."""
    bad = []
    for field, tok, body in bodies:
        TALLY["numeric edges (HTTP)"] += 1
        r = post(teacher, path, body)
        if r.status_code != 200:
            if not refused_by_name(r, field):
                bad.append((field, tok, r.status_code, r.text[:200]))
            continue
        out, sent = json.loads(r.text, parse_constant=no_constant), json.loads(body)
        if not unchanged(out, sent, field, json.loads(tok)):
            bad.append((field, tok, 200, r.text[:200]))
    return bad


def test_numeric_edges_over_http_logprobs(teacher):
    def unchanged(out, sent, field, value):
        ok = out["prompt_token_ids"] == sent["prompt_token_ids"]
        ok &= [t["token_id"] for t in out["tokens"]] == sent["completion_token_ids"]
        ok &= all(len(t["top"]) == sent["top_k"] for t in out["tokens"])
        if field == "temperature":
            ok &= np.float32(1e-6) <= np.float32(value) <= 1e6
        return ok

    bodies = hostile_bodies(LOGPROBS_BODY, LOGPROBS_FIELDS)
    assert not (bad := edge_failures(teacher, "/v1/logprobs", bodies, unchanged)), bad


def test_numeric_edges_over_http_completions(teacher):
    def unchanged(out, sent, field, value):
        choice = out["choices"][0]
        ok = choice["prompt_token_ids"] == sent["prompt"]
        ok &= all(
            list(e)[0] == str(i)
            for e, i in zip(choice["prompt_logprobs"][1:], sent["prompt"][1:], strict=True)
        )
        if field == "seed":
            ok &= 0 <= value < 2**63  # the seed drawn with is the seed sent
        if field == "temperature":
            ok &= value == 0 or np.float32(1e-6) <= np.float32(value) <= 1e6
        return ok

    bodies = hostile_bodies(COMPLETIONS_BODY, COMPLETIONS_FIELDS)
    assert not (bad := edge_failures(teacher, "/v1/completions", bodies, unchanged)), bad
