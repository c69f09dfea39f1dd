"""Request validation (both stages) with the field named, and the domain dataclasses' wire round trips."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from services.teacher import codec
from services.teacher.errors import InvalidRequest, from_code, http_status
from services.teacher.modelinfo import describe
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.settings import in_process_spec
from services.teacher.types import ModelInfo, ScoreRequest, ScoreResult
from services.teacher.validation import validate_request


@pytest.fixture(scope="module")
def info(tiny_teacher) -> ModelInfo:
    """The real ModelInfo of the tiny teacher (read from its config and tokenizer), small guard limits."""
    spec = in_process_spec(str(tiny_teacher), max_top_k=16, max_full_elements=10 * 512, max_batch_tokens=4096)
    model_info, _ = describe(spec)
    assert model_info.vocab_size == 512 and model_info.max_context == 1024
    return model_info


def invalid(fn, *args, **kwargs) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as excinfo:
        fn(*args, **kwargs)
    err = excinfo.value
    assert err.code == "INVALID_ARGUMENT" and http_status(err) == 400
    assert f"`{err.param}`" in err.message, f"message must name the field: {err.message!r}"
    return err


# -- stage one: static checks when a request is built ---------------------------------------------------


@pytest.mark.parametrize("completion", [[], np.zeros(0, dtype=np.int64)])
def test_empty_completion(completion):
    err = invalid(ScoreRequest, [1, 2], completion)
    assert err.param == "completion_token_ids"
    assert "at least one token" in err.message


def test_empty_prompt():
    err = invalid(ScoreRequest, [], [1])
    assert err.param == "prompt_token_ids"


@pytest.mark.parametrize("param", ["prompt_token_ids", "completion_token_ids"])
def test_negative_ids(param):
    ids = {"prompt_token_ids": [1, 2], "completion_token_ids": [3, 4]}
    ids[param] = [5, -3]
    err = invalid(ScoreRequest, **ids)
    assert err.param == param and "-3" in err.message and ">= 0" in err.message


@pytest.mark.parametrize("bad", [[1.5, 2.0], [[1, 2]], ["a"], None])
def test_non_integer_ids(bad):
    err = invalid(ScoreRequest, [1], bad)
    assert err.param == "completion_token_ids" and "integer" in err.message


@pytest.mark.parametrize("top_k, fragment", [(-1, ">= 0, got -1"), (True, "integer"), (2.0, "integer")])
def test_top_k_static(top_k, fragment):
    err = invalid(ScoreRequest, [1], [2], top_k=top_k)
    assert err.param == "top_k" and fragment in err.message


@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, "hot", None])
def test_temperature(temperature):
    err = invalid(ScoreRequest, [1], [2], temperature=temperature)
    assert err.param == "temperature"
    assert str(temperature) in err.message or repr(temperature) in err.message


@pytest.mark.parametrize("full_dtype", ["float64", "int32", "fp16", "", None])
def test_unknown_full_dtype(full_dtype):
    err = invalid(ScoreRequest, [1], [2], full=True, full_dtype=full_dtype)
    assert err.param == "full_dtype"
    assert "float32" in err.message and "bfloat16" in err.message  # lists the accepted values


def test_unknown_full_dtype_from_wire():
    """INT32 or an unknown enum value on the wire is rejected with the field named."""
    for enum in (pb.INT32, 99):
        m = pb.ScoreRequest(prompt_token_ids=[1], completion_token_ids=[2], full=True, full_dtype=enum)
        err = invalid(ScoreRequest.from_pb, m)
        assert err.param == "full_dtype"


def test_negative_timeout():
    err = invalid(ScoreRequest, [1], [2], timeout_ms=-5)
    assert err.param == "timeout_ms"


# -- stage two: model-dependent checks against ModelInfo --------------------------------------------------


@pytest.mark.parametrize("param", ["prompt_token_ids", "completion_token_ids"])
@pytest.mark.parametrize("offset", [0, 1, 10_000])
def test_ids_at_or_above_vocab(info, param, offset):
    bad_id = info.vocab_size + offset
    ids = {"prompt_token_ids": [1, 2], "completion_token_ids": [3, 4]}
    ids[param] = [7, bad_id, 8]
    err = invalid(validate_request, ScoreRequest(**ids), info)
    assert err.param == param
    assert str(bad_id) in err.message and str(info.vocab_size) in err.message


def test_largest_valid_id_passes(info):
    validate_request(ScoreRequest([0], [info.vocab_size - 1]), info)


def test_context_length(info):
    n = info.max_context
    validate_request(ScoreRequest([1] * (n - 1), [2]), info)  # exactly max_context: fine
    err = invalid(validate_request, ScoreRequest([1] * (n - 10), [2] * 11), info)
    assert err.param == "completion_token_ids"
    assert str(n) in err.message and str(n + 1) in err.message and "max_context" in err.message


def test_batch_token_budget(info):
    """A request that could never fit one forward pass is rejected, not left to stall a queue."""
    small = dataclasses.replace(info, max_batch_tokens=50)
    err = invalid(validate_request, ScoreRequest([1] * 40, [2] * 11), small)
    assert err.param == "completion_token_ids" and "max_batch_tokens" in err.message


def test_top_k_above_max(info):
    validate_request(ScoreRequest([1], [2], top_k=info.max_top_k), info)
    err = invalid(validate_request, ScoreRequest([1], [2], top_k=info.max_top_k + 1), info)
    assert err.param == "top_k"
    assert err.message == f"`top_k` must be <= {info.max_top_k}, got {info.max_top_k + 1}."


def test_top_k_above_vocab(info):
    big = dataclasses.replace(info, max_top_k=10_000)
    err = invalid(validate_request, ScoreRequest([1], [2], top_k=info.vocab_size + 1), big)
    assert err.param == "top_k" and "vocab_size" in err.message


def test_full_rows_memory_guard(info):
    per_row = info.vocab_size
    rows_allowed = info.max_full_elements // per_row  # 10 with the fixture's limits
    validate_request(ScoreRequest([1], [2] * rows_allowed, full=True), info)
    validate_request(ScoreRequest([1], [2] * (rows_allowed + 1), full=False), info)  # guard is for full only
    err = invalid(validate_request, ScoreRequest([1], [2] * (rows_allowed + 1), full=True), info)
    assert err.param == "full"
    assert str((rows_allowed + 1) * per_row) in err.message and str(info.max_full_elements) in err.message


def test_full_rows_unsupported_backend(info):
    no_full = dataclasses.replace(info, supports_full=False, backend="vllm")
    err = invalid(validate_request, ScoreRequest([1], [2], full=True), no_full)
    assert err.param == "full" and "vllm" in err.message


def test_error_survives_rebuild_from_code():
    """Workers send errors as (code, message, param); the rebuilt exception keeps all three."""
    err = from_code("INVALID_ARGUMENT", "`top_k` must be <= 64, got 100.", "top_k")
    assert isinstance(err, InvalidRequest) and err.param == "top_k" and http_status(err) == 400
    assert http_status(from_code("SOMETHING_ELSE", "boom")) == 500


# -- wire round trips ---------------------------------------------------------------------------------------


def test_score_request_round_trip():
    req = ScoreRequest(
        np.array([3, 1, 4, 1, 5]),
        [9, 2, 6],
        request_id="req-7",
        job_id="job-a",
        top_k=12,
        full=True,
        temperature=0.5,
        full_dtype="bfloat16",
        timeout_ms=2500,
    )
    m = pb.ScoreRequest.FromString(req.to_pb().SerializeToString())
    assert list(m.prompt_token_ids) == [3, 1, 4, 1, 5] and m.full_dtype == pb.BFLOAT16
    back = ScoreRequest.from_pb(m)
    for f in dataclasses.fields(ScoreRequest):
        a, b = getattr(req, f.name), getattr(back, f.name)
        if isinstance(a, np.ndarray):
            assert b.dtype == np.int64 and np.array_equal(a, b), f.name
        else:
            assert a == b, f.name


def test_score_request_wire_defaults():
    """Unset proto fields mean: temperature 1.0, full_dtype float32, job 'default', top_k 0."""
    m = pb.ScoreRequest(prompt_token_ids=[1], completion_token_ids=[2, 3])
    req = ScoreRequest.from_pb(m)
    assert req.temperature == 1.0 and req.full_dtype == "float32" and req.job_id == "default"
    assert req.top_k == 0 and not req.full and req.timeout_ms == 0
    # temperature travels as float32: a non-representable value comes back rounded, not changed otherwise
    req = ScoreRequest.from_pb(ScoreRequest([1], [2], temperature=0.7).to_pb())
    assert req.temperature == pytest.approx(0.7, rel=1e-7)


def test_score_request_from_pb_validates():
    m = pb.ScoreRequest(prompt_token_ids=[1], completion_token_ids=[], request_id="x")
    assert invalid(ScoreRequest.from_pb, m).param == "completion_token_ids"
    m = pb.ScoreRequest(prompt_token_ids=[1], completion_token_ids=[2], temperature=-1.0)
    assert invalid(ScoreRequest.from_pb, m).param == "temperature"
    m = pb.ScoreRequest(prompt_token_ids=[1], completion_token_ids=[-2])
    assert invalid(ScoreRequest.from_pb, m).param == "completion_token_ids"


@pytest.mark.parametrize("full_dtype", [None, "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("top_k", [0, 3])
def test_score_result_round_trip(full_dtype, top_k):
    rng = np.random.default_rng(0)
    T, V = 4, 9
    full32 = rng.standard_normal((T, V)).astype(np.float32)
    full = None if full_dtype is None else codec.to_storage(full32, full_dtype)
    res = ScoreResult(
        request_id="r1",
        token_logprobs=rng.standard_normal(T).astype(np.float32),
        top_k_ids=rng.integers(0, V, (T, top_k)).astype(np.int32) if top_k else None,
        top_k_logprobs=rng.standard_normal((T, top_k)).astype(np.float32) if top_k else None,
        full_logprobs=full,
        full_dtype=full_dtype or "float32",
        queue_ms=1.5,
        compute_ms=20.25,
        batch_size=7,
        worker_id="host:123",
    )
    m = pb.ScoreResponse.FromString(res.to_pb().SerializeToString())
    assert m.token_logprobs.dtype == pb.FLOAT32 and list(m.token_logprobs.shape) == [T]
    assert m.HasField("top_k_ids") == bool(top_k) and m.HasField("full_logprobs") == (full is not None)
    back = ScoreResult.from_pb(m)
    assert (back.request_id, back.queue_ms, back.compute_ms, back.batch_size, back.worker_id) == (
        "r1",
        1.5,
        20.25,
        7,
        "host:123",
    )
    np.testing.assert_array_equal(back.token_logprobs, res.token_logprobs)
    if top_k:
        assert back.top_k_ids.dtype == np.int32
        np.testing.assert_array_equal(back.top_k_ids, res.top_k_ids)
        np.testing.assert_array_equal(back.top_k_logprobs, res.top_k_logprobs)
    else:
        assert back.top_k_ids is None and back.top_k_logprobs is None
    if full is None:
        assert back.full_logprobs is None and back.full_float32() is None
    else:
        assert back.full_dtype == full_dtype
        assert back.full_logprobs.dtype == full.dtype
        np.testing.assert_array_equal(back.full_logprobs, full)
        np.testing.assert_array_equal(back.full_float32(), res.full_float32())
        tol = {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[full_dtype]
        assert np.all(np.abs(back.full_float32() - full32) <= tol * np.maximum(1, np.abs(full32)))


def test_model_info_round_trip(info):
    back = ModelInfo.from_pb(pb.ModelInfo.FromString(info.to_pb().SerializeToString()))
    for f in dataclasses.fields(ModelInfo):
        assert getattr(back, f.name) == getattr(info, f.name), f.name
