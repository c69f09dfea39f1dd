"""The wire `Tensor` codec: round trips for every dtype and shape, bf16 exactness, and malformed tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.teacher import codec
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb

SHAPES = [(0,), (0, 5), (7,), (3, 4), (2, 3, 4), ()]
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32}


def sample(shape, dtype: str, seed: int = 0) -> torch.Tensor:
    """Values exactly representable in `dtype` (so a round trip must be bit-exact)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == "int32":
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
    return (torch.randn(shape, generator=g) * 10).to(TORCH[dtype])


def through_wire(t: pb.Tensor) -> pb.Tensor:
    """Serialises and parses the message, as a transport would."""
    return pb.Tensor.FromString(t.SerializeToString())


@pytest.mark.parametrize("dtype", list(ITEMSIZE))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_torch_input(dtype, shape):
    x = sample(shape, dtype)
    msg = through_wire(codec.encode(x, dtype))
    assert msg.dtype == codec.DTYPE_NAMES[dtype]
    assert tuple(msg.shape) == shape
    assert len(msg.data) == x.numel() * ITEMSIZE[dtype]
    out = codec.decode(msg)
    assert out.shape == shape
    expected = x.float().numpy() if dtype == "bfloat16" else x.numpy()
    assert out.dtype == expected.dtype
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_numpy_input(dtype, shape):
    x = sample(shape, dtype, seed=1).numpy()
    out = codec.decode(through_wire(codec.encode(x, dtype)))
    assert out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bfloat16_from_numpy_float32(shape):
    """numpy float32 input holding bf16-representable values survives a bf16 round trip exactly."""
    x = sample(shape, "bfloat16", seed=2).float().numpy()
    assert x.dtype == np.float32
    out = codec.decode(through_wire(codec.encode(x, "bfloat16")))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)


def test_bfloat16_wire_bytes_are_the_high_halves():
    """BFLOAT16 on the wire is the upper 16 bits of each float32, little-endian."""
    x = np.array([1.0, -2.0, 0.15625, 2.0**127, -0.0, np.inf], dtype=np.float32)  # bf16-exact
    msg = codec.encode(x, "bfloat16")
    expected = (x.view("<u4") >> 16).astype("<u2").tobytes()
    assert msg.data == expected
    raw = codec.decode(msg, raw_bf16=True)
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, np.frombuffer(expected, dtype="<u2"))
    np.testing.assert_array_equal(codec.decode(msg), x)
    # raw bits given as uint16 are passed through untouched
    assert codec.encode(raw, "bfloat16").data == expected


def test_bfloat16_rounds_to_nearest_like_torch():
    """Values not representable in bf16 are rounded as torch rounds them (nearest even), not truncated."""
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    out = codec.decode(codec.encode(x, "bfloat16"))
    np.testing.assert_array_equal(out, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert not np.array_equal(out, x)


def test_float_casts_and_special_values():
    """Encoding casts to the wire dtype; inf, -inf, nan and -0.0 survive."""
    x = np.array([np.inf, -np.inf, np.nan, -0.0, 1e-3], dtype=np.float64)
    for dtype in ("float32", "float16", "bfloat16"):
        out = codec.decode(codec.encode(x, dtype))
        assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])
        assert out[3] == 0 and np.signbit(out[3])
    np.testing.assert_array_equal(
        codec.decode(codec.encode([1, 2, 3], "int32")), np.array([1, 2, 3], np.int32)
    )


def test_non_contiguous_inputs():
    """Transposed / strided arrays are encoded in row-major order of their logical shape."""
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    for x in (base.T, base[:, ::2], torch.from_numpy(base).T):
        out = codec.decode(codec.encode(x, "float32"))
        np.testing.assert_array_equal(out, np.asarray(x))


def test_decode_is_zero_copy_view():
    msg = codec.encode(np.arange(6, dtype=np.float32).reshape(2, 3), "float32")
    out = codec.decode(msg)
    assert not out.flags.writeable  # a view over the message bytes, not a copy


def test_encode_into_existing_message():
    m = pb.ScoreResponse()
    codec.encode(np.ones((2, 3), np.float32), "float32", out=m.full_logprobs)
    codec.encode(np.zeros((4,), np.float16), "float16", out=m.full_logprobs)  # overwrite: shape replaced
    assert m.HasField("full_logprobs")
    assert list(m.full_logprobs.shape) == [4] and m.full_logprobs.dtype == pb.FLOAT16
    np.testing.assert_array_equal(codec.decode(m.full_logprobs), np.zeros(4, np.float16))


@pytest.mark.parametrize(
    "data, shape, dtype",
    [
        (b"\x00" * 12, [2, 2], pb.FLOAT32),  # 3 elements, shape needs 4
        (b"\x00" * 16, [3], pb.FLOAT32),  # 4 elements, shape needs 3
        (b"", [], pb.INT32),  # a scalar needs 1 element
        (b"\x00" * 6, [2, 2], pb.FLOAT16),
        (b"\x00" * 2, [0], pb.BFLOAT16),
    ],
)
def test_decode_shape_mismatch(data, shape, dtype):
    with pytest.raises(ValueError, match="shape"):
        codec.decode(pb.Tensor(data=data, shape=shape, dtype=dtype))


def test_decode_bad_dtype_and_ragged_bytes():
    with pytest.raises(ValueError, match="dtype"):
        codec.decode(pb.Tensor(data=b"\x00" * 4, shape=[1], dtype=pb.DTYPE_UNSPECIFIED))
    with pytest.raises(ValueError):  # 5 bytes is not a whole number of float32 elements
        codec.decode(pb.Tensor(data=b"\x00" * 5, shape=[1], dtype=pb.FLOAT32))


def test_dtype_names():
    for name, enum in codec.DTYPE_NAMES.items():
        assert codec.dtype_name(codec.dtype_enum(name)) == name
        assert codec.dtype_enum(name) == enum
    with pytest.raises(ValueError, match="float64"):
        codec.dtype_enum("float64")
    with pytest.raises(ValueError):
        codec.dtype_name(pb.DTYPE_UNSPECIFIED)
    with pytest.raises(ValueError, match="float64"):
        codec.encode(np.zeros(3), "float64")


@pytest.mark.parametrize("dtype", codec.FLOAT_DTYPES)
@pytest.mark.parametrize("rows", [0, 3, 300])
def test_wire_parts_parse_as_the_serialized_response(dtype, rows):
    """A response sent as pieces (full rows not copied into a message first) parses into the same message
    protobuf's own serializer writes."""
    from services.teacher.types import ScoreResult

    rng = np.random.default_rng(rows)
    full = rng.standard_normal((rows, 1000)).astype(np.float32)
    res = ScoreResult(
        "r1",
        rng.standard_normal(rows).astype(np.float32),
        full_logprobs=codec.to_storage(full, dtype),
        full_dtype=dtype,
        candidate_logprobs=np.ones((rows, 2), np.float32),
        worker_id="w",
    )
    joined = b"".join(res.wire_parts())
    assert pb.ScoreResponse.FromString(joined) == res.to_pb()
    # the same bytes, but for an empty data field that protobuf's serializer leaves out (2 bytes)
    assert 0 <= len(joined) - len(res.to_pb().SerializeToString()) <= (2 if rows == 0 else 0)
