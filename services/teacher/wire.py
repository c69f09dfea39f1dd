"""A check of raw protobuf bytes that the parser does not make: an int32 (or enum) field whose varint holds a
value outside int32.

Protobuf parsers keep the low 32 bits of such a varint (the language guides' "cast"), so a token id sent as
2^32 + 5 parses as 5 and would be scored as token 5 (found by tests/test_hostile_numbers.py). Every encoder writes
an int32 as a varint of its 64-bit two's complement, so a value fits when it is below 2^31 or at least 2^64 - 2^31
(a negative int32, which the value checks then refuse by name). Legitimate ids are short varints: only varints of
five bytes or more (values >= 2^28) are decoded one by one, the rest are skipped with one numpy pass.
"""

from __future__ import annotations

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor

_INT32_TYPES = (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_ENUM)
_LOW, _HIGH = 2**31, 2**64 - 2**31
"""A varint value v fits int32 when v < _LOW or v >= _HIGH."""


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(data):
        b = data[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i
    raise ValueError("truncated varint")


def _packed_overflows(payload: bytes) -> bool:
    ends = np.flatnonzero(np.frombuffer(payload, np.uint8) < 0x80)
    lengths = np.diff(ends, prepend=-1)
    for start in (ends - lengths + 1)[lengths >= 5].tolist():
        v, _ = _varint(payload, start)
        if _LOW <= v < _HIGH:
            return True
    return False


def int32_overflow(data: bytes, descriptor: Descriptor) -> str | None:
    """The name of the first top-level int32 or enum field of the message `descriptor` describes whose value in
    `data` does not fit int32 (as a single varint or inside a packed run), else None. Bytes the parser refuses
    anyway (truncated, groups) end the scan with None."""
    fields, i = descriptor.fields_by_number, 0
    try:
        while i < len(data):
            tag, i = _varint(data, i)
            number, kind = tag >> 3, tag & 7
            field = fields.get(number)
            checked = field is not None and field.type in _INT32_TYPES
            if kind == 0:
                v, i = _varint(data, i)
                if checked and _LOW <= v < _HIGH:
                    return field.name
            elif kind == 2:
                n, i = _varint(data, i)
                if checked and _packed_overflows(data[i : i + n]):
                    return field.name
                i += n
            elif kind in (1, 5):
                i += 8 if kind == 1 else 4
            else:
                return None
    except ValueError:
        return None
    return None
