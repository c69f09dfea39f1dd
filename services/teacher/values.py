"""One set of value checks shared by every route: the native API (HTTP and gRPC, through `ScoreRequest`), the
vLLM dialect and the analysis routes (/v1/compare, /v1/rescue).

Each bound is written once here: the plain functions raise InvalidRequest naming the field (used when a
request is built), and the pydantic types below wrap the same bounds for the HTTP bodies (strict: `"3"`,
`true` and `3.0` are not an integer). A hostile client found every route that had its own copy (issue 27).
"""

from __future__ import annotations

import json
import math
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, Field, StrictInt

from services.teacher.errors import InvalidRequest

MAX_INT32 = 2**31 - 1
"""Largest value of an int32 wire field (`top_k`, `num_candidates`, ids): a larger one cannot be queued (the
protobuf encoder raises), so every route refuses it by name first (issue 27 §4: `"top_k": 2147483648` was a 500)."""
MAX_TOKEN_ID = MAX_INT32
"""Largest token id any route accepts: ids travel as int32 on the wire (the model's vocabulary bounds them
further, in validation.py)."""
MAX_INT64 = 2**63 - 1
"""Largest value of an int64 wire field (`timeout_ms`, `seed`)."""
MIN_TEMPERATURE = 1e-6
"""Smallest temperature scored: below it float32 cannot compute the row (a denormal or zero divisor gives inf
and NaN, and 1e-320 rounds to 0, which the wire reads as the default 1.0); at 1e-6 every logit gap above
~1e-4 already gives exp(-100), so a smaller temperature would change nothing but greedy ties."""
MAX_TEMPERATURE = 1e6
"""Largest temperature scored (float32 rounds larger divisors of typical logits to a uniform row)."""
MAX_SEED = MAX_INT64
"""Largest seed (int64 on the wire and in torch's generators)."""


def check_temperature(value, param: str = "temperature", *, zero_ok: bool = False) -> float:
    """`value` as a float if it is a number in [MIN_TEMPERATURE, MAX_TEMPERATURE] (or 0 where `zero_ok`, the
    greedy of sampling routes); InvalidRequest naming `param` otherwise (NaN and inf included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise InvalidRequest(f"`{param}` must be a number, got {value!r}.", param)
    t = float(value)
    if zero_ok and t == 0.0:
        return t
    if zero_ok and t < 0:
        raise InvalidRequest(f"`{param}` must be >= 0 (0: greedy), got {value}.", param)
    if not math.isfinite(t):
        raise InvalidRequest(f"`{param}` must be a finite number, got {value}.", param)
    if not np.float32(MIN_TEMPERATURE) <= np.float32(t) <= np.float32(MAX_TEMPERATURE):  # as it travels
        zero = "0 (greedy) or " if zero_ok else "> 0, "
        raise InvalidRequest(
            f"`{param}` must be {zero}in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (what float32 can compute), "
            f"got {value!r}.",
            param,
        )
    return t


def _integer(value, param: str) -> None:
    """InvalidRequest naming `param` unless `value` is a Python or numpy integer (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidRequest(f"`{param}` must be an integer, got {value!r}.", param)


def check_seed(value, param: str = "seed") -> int:
    """`value` if it is an integer in [0, MAX_SEED]; InvalidRequest naming `param` otherwise."""
    _integer(value, param)
    if not 0 <= value <= MAX_SEED:
        raise InvalidRequest(f"`{param}` must be in [0, 2^63), got {value}.", param)
    return int(value)


def check_count(value, param: str, high: int = MAX_INT32) -> int:
    """`value` if it is an integer in [0, `high`] (a count or limit that travels as int32, or int64 with
    `high=MAX_INT64`); InvalidRequest naming `param` otherwise."""
    _integer(value, param)
    if value < 0:
        raise InvalidRequest(f"`{param}` must be >= 0, got {value}.", param)
    if value > high:
        raise InvalidRequest(f"`{param}` must be <= {high}, got {value}.", param)
    return int(value)


def check_token_id_range(arr: np.ndarray, param: str) -> None:
    """InvalidRequest naming `param` when an id of the integer array `arr` is negative or over MAX_TOKEN_ID
    (checked before any cast, so that 2^63 .. 2^64-1 in a uint64 array never wrap to negative ids)."""
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise InvalidRequest(f"`{param}` must be >= 0, got {lo}.", param)
    if hi > MAX_TOKEN_ID:
        raise InvalidRequest(f"`{param}` must be <= {MAX_TOKEN_ID} (int32 token ids), got {hi}.", param)


def check_text(value: str, param: str) -> str:
    """`value` if it encodes as UTF-8 (no lone surrogate, which no tokenizer can read); InvalidRequest naming
    `param` otherwise."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequest(
            f"`{param}` must be valid Unicode: it holds a lone surrogate at character {err.start}.", param
        ) from None
    return value


def parse_json(raw: bytes):
    """A request body as JSON; InvalidRequest naming `body` when it is not JSON, not UTF-8, or nested too
    deeply for the parser (RecursionError)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidRequest(f"`body` is not valid JSON: {str(err)[:200]}.", "body") from None


def _text(value: str) -> str:
    try:  # pydantic names the field (its location) before this message
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"must be valid Unicode: it holds a lone surrogate at character {err.start}"
        ) from None
    return value


StrictIds = list[StrictInt]
"""Token ids in a JSON body whose route answers out-of-range values with 400 (/v1/logprobs): the type here (a
string or a bool is a 422), the range when the ScoreRequest is built (`check_token_id_range`)."""
TokenId = Annotated[StrictInt, Field(ge=0, le=MAX_TOKEN_ID)]
"""A token id in a JSON body."""
TokenIds = list[TokenId]
"""A list of token ids in a JSON body."""
TopK = Annotated[StrictInt, Field(ge=0, le=MAX_INT32)]
"""`top_k` in a JSON body (the model's limit is checked against ModelInfo)."""
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
"""A seed in a JSON body."""
Temperature = Annotated[
    float, Field(strict=True, allow_inf_nan=False, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
]
"""A scoring temperature in a JSON body."""
SamplingTemperature = Annotated[
    float,
    Field(strict=True, allow_inf_nan=False),
    AfterValidator(lambda t: check_temperature(t, zero_ok=True)),
]
"""A sampling temperature in a JSON body: 0 (greedy) or a scoring temperature."""
Text = Annotated[str, Field(strict=True), AfterValidator(_text)]
"""Prompt or answer text in a JSON body: valid Unicode (no lone surrogate)."""
