"""Property tests (hypothesis) of the codec and of request validation: whatever arrives, the outcome is a
result or the documented error naming a field, never another exception. Case counts go to tests/tally.py."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tally import TALLY

from services.teacher import codec
from services.teacher.errors import InvalidRequest
from services.teacher.modelinfo import describe
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.settings import in_process_spec
from services.teacher.types import ScoreRequest
from services.teacher.validation import validate_request

FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
FIELDS = {
    "prompt_token_ids",
    "completion_token_ids",
    "top_k",
    "temperature",
    "full_dtype",
    "timeout_ms",
    "job_id",
    "request_id",
    "candidate_ids",
    "num_candidates",
    "full",
}
NUMPY = {"float32": np.float32, "float16": np.float16, "int32": np.int32}


@pytest.fixture(scope="module")
def info(tiny_teacher):
    spec = in_process_spec(str(tiny_teacher), max_top_k=16, max_full_elements=10 * 512, max_batch_tokens=600)
    return describe(spec)[0]


@FAST
@given(
    dtype=st.sampled_from(sorted(NUMPY)),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    data=st.data(),
)
def test_codec_round_trip_is_exact(dtype, shape, data):
    TALLY["codec round trips"] += 1
    x = data.draw(hnp.arrays(NUMPY[dtype], shape))
    out = codec.decode(pb.Tensor.FromString(codec.encode(x, dtype).SerializeToString()))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.tobytes() == np.asarray(x, dtype=out.dtype).tobytes()  # bit-exact, NaNs included


@FAST
@given(values=hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=8)))
def test_bfloat16_is_the_top_half_of_float32(values):
    TALLY["codec round trips"] += 1
    out = codec.decode(codec.encode(values, "bfloat16"))
    finite = np.isfinite(values) & (np.abs(values) < 3.38e38)  # above, bf16 rounds to inf (correctly)
    # round-to-nearest into 8 mantissa bits: within half a bf16 ulp (relative 2^-8)
    assert np.all(np.abs(out[finite] - values[finite]) <= np.abs(values[finite]) * 2.0**-8 + 1e-38)


@FAST
@given(
    data=st.binary(max_size=64),
    shape=st.lists(st.integers(-3, 40), max_size=4),
    dtype=st.integers(-2, 8),
)
def test_decoding_hostile_tensors_raises_only_value_error(data, shape, dtype):
    TALLY["hostile tensors"] += 1
    t = pb.Tensor(data=data, shape=shape, dtype=dtype if dtype >= 0 else 0)
    try:
        out = codec.decode(t)
    except ValueError:
        return
    assert out.size * out.itemsize == len(data) or t.dtype == pb.BFLOAT16


ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(-5, 2000), max_size=8),
    st.lists(st.one_of(st.integers(), st.text(max_size=2), st.floats()), max_size=4),
)


VALID = {
    "prompt_token_ids": [1, 2],
    "completion_token_ids": [3],
    "top_k": 0,
    "temperature": 1.0,
    "full_dtype": "float32",
    "job_id": "job",
    "request_id": "r",
    "timeout_ms": 0,
    "full": False,
}
HOSTILE = st.one_of(
    ANY,
    st.sampled_from(["float32", "float16", "bfloat16", "int32", "", "a b", "\ud800", "x" * 200]),
    st.text(max_size=140),
)


@FAST
@given(hostile=st.dictionaries(st.sampled_from(sorted(VALID)), HOSTILE, min_size=1, max_size=3))
def test_building_a_request_gives_a_request_or_an_error_naming_the_field(info, hostile):
    """A valid request with one to three fields replaced by hostile values (any type)."""
    TALLY["requests built"] += 1
    try:
        req = ScoreRequest(**{**VALID, **hostile})
    except InvalidRequest as err:
        assert err.param in FIELDS and f"`{err.param}`" in err.message
        return
    assert req.prompt_token_ids.size >= 1 and req.completion_token_ids.size >= 1 and req.top_k >= 0
    try:
        validate_request(req, info)
    except InvalidRequest as err:
        assert err.param in FIELDS and f"`{err.param}`" in err.message


@FAST
@given(raw=st.binary(max_size=200))
def test_hostile_protobuf_bytes_give_a_request_or_an_error_naming_the_field(info, raw):
    TALLY["protobuf bytes (parser)"] += 1
    try:
        msg = pb.ScoreRequest.FromString(raw)
    except DecodeError:
        return
    try:
        validate_request(ScoreRequest.from_pb(msg), info)
    except InvalidRequest as err:
        assert err.param in FIELDS


def test_candidate_ids_without_num_candidates_name_a_known_field():
    """The case hypothesis found once in raw bytes: candidate ids with num_candidates 0."""
    m = pb.ScoreRequest(prompt_token_ids=[1], completion_token_ids=[1], candidate_ids=[1], num_candidates=0)
    with pytest.raises(InvalidRequest) as ei:
        ScoreRequest.from_pb(m)
    assert ei.value.param == "num_candidates" and ei.value.param in FIELDS
