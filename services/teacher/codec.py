"""Converts numpy / torch arrays to and from the wire `Tensor` (packed little-endian bytes, shape, dtype).

No per-element Python loops: encoding is one `tobytes()`, decoding is a zero-copy `np.frombuffer` view.
numpy has no bfloat16, so BFLOAT16 arrays live in numpy as their raw uint16 bit patterns; `decode` widens
them to float32 (exact) unless asked for the raw bits.
"""

from __future__ import annotations

import numpy as np
import torch

from services.teacher.pb.teacher.v1 import teacher_pb2 as pb

# dtype name <-> wire enum <-> numpy storage type (little-endian).
DTYPE_NAMES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16, "int32": pb.INT32}
_ENUM_TO_NAME = {v: k for k, v in DTYPE_NAMES.items()}
_STORAGE = {pb.FLOAT32: "<f4", pb.FLOAT16: "<f2", pb.BFLOAT16: "<u2", pb.INT32: "<i4"}
_TORCH = {
    pb.FLOAT32: torch.float32,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.INT32: torch.int32,
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def dtype_enum(name: str) -> int:
    """Wire enum of a dtype name ("float32", ...); ValueError for an unknown name."""
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_NAMES)}") from None


def dtype_name(enum: int) -> str:
    """Dtype name of a wire enum; ValueError for DTYPE_UNSPECIFIED or an unknown value."""
    try:
        return _ENUM_TO_NAME[enum]
    except KeyError:
        raise ValueError(f"unknown dtype enum {enum}") from None


def dtype_itemsize(name: str) -> int:
    """Bytes per element of a dtype name on the wire."""
    return np.dtype(_STORAGE[dtype_enum(name)]).itemsize


def to_storage(x: np.ndarray | torch.Tensor, dtype: str) -> np.ndarray:
    """The little-endian numpy array whose bytes go on the wire for `x` cast to `dtype`."""
    enum = dtype_enum(dtype)
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device="cpu", dtype=_TORCH[enum]).contiguous()
        if enum == pb.BFLOAT16:
            return t.view(torch.int16).numpy().view("<u2")
        return t.numpy()
    arr = np.asarray(x)
    # np.asarray(order="C") rather than np.ascontiguousarray, which turns a 0-d array into shape (1,).
    if enum == pb.BFLOAT16:
        if arr.dtype == np.uint16:  # already raw bf16 bits
            return np.asarray(arr, dtype="<u2", order="C")
        return to_storage(torch.from_numpy(np.asarray(arr, dtype=np.float32, order="C")), dtype)
    return np.asarray(arr, dtype=_STORAGE[enum], order="C")


def encode(x: np.ndarray | torch.Tensor, dtype: str, out: pb.Tensor | None = None) -> pb.Tensor:
    """Packs `x` (any shape, including empty) as a `Tensor` of `dtype`; fills `out` in place if given."""
    storage = to_storage(x, dtype)
    t = out if out is not None else pb.Tensor()
    t.data = storage.tobytes()
    del t.shape[:]
    t.shape.extend(storage.shape)
    t.dtype = dtype_enum(dtype)
    return t


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tensor_field_parts(field_number: int, x: np.ndarray | torch.Tensor, dtype: str) -> list:
    """The protobuf encoding of a `Tensor` field (number `field_number`) holding `x` cast to `dtype`, as pieces
    whose concatenation is the field: the element bytes are a view of the storage array, not copied.

    Protobuf messages concatenate (a message is its fields, in any order), so a message serialized without this
    field, followed by these pieces, parses as the message with it: large rows reach the wire with one copy."""
    storage = to_storage(x, dtype)
    meta = pb.Tensor(shape=storage.shape, dtype=dtype_enum(dtype)).SerializeToString()
    data = memoryview(storage.reshape(-1).view(np.uint8))  # bytes of the elements, no copy
    data_head = _varint(1 << 3 | 2) + _varint(data.nbytes)  # field 1 (data), length-delimited
    length = len(meta) + len(data_head) + data.nbytes
    return [_varint(field_number << 3 | 2) + _varint(length) + meta + data_head, data]


def decode(t: pb.Tensor, *, raw_bf16: bool = False) -> np.ndarray:
    """The array in `t`: a read-only zero-copy view for FLOAT32/FLOAT16/INT32 (and raw BFLOAT16 bits),
    a float32 copy for BFLOAT16 unless `raw_bf16`."""
    if t.dtype not in _STORAGE:
        raise ValueError(f"tensor has unknown dtype enum {t.dtype}")
    shape = tuple(int(s) for s in t.shape)
    arr = np.frombuffer(t.data, dtype=_STORAGE[t.dtype])
    expected = int(np.prod(shape)) if shape else 1
    if arr.size != expected:
        raise ValueError(f"tensor data holds {arr.size} elements but shape {list(shape)} needs {expected}")
    arr = arr.reshape(shape)
    if t.dtype == pb.BFLOAT16 and not raw_bf16:
        return bf16_bits_to_float32(arr)
    return arr


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widens raw bfloat16 bit patterns (uint16) to float32 exactly (bf16 is the top half of a float32)."""
    return (bits.astype("<u4") << 16).view("<f4")
