"""Domain dataclasses of the teacher: requests, results and model info, with `from_pb` / `to_pb`.

Transports (gRPC, HTTP, the Redis queue) convert to and from these; engines only ever see these.
Static validation (checks that need no model) runs when a request is built, so a malformed request can
never reach a queue; model-dependent checks live in `validation.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

from services.teacher import codec
from services.teacher.errors import InvalidRequest
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.values import (
    MAX_INT64,
    check_count,
    check_seed,
    check_temperature,
    check_token_id_range,
)

MAX_ID_CHARS = 128
"""Longest `job_id` / `request_id`: a job id becomes part of Redis keys and a Prometheus label."""
_ID_RE = re.compile(r"[A-Za-z0-9._:/@+-]*")


def check_id(value, param: str, *, required: bool) -> str:
    """`value` if it is a valid job or request id: a string of at most MAX_ID_CHARS characters from
    `A-Z a-z 0-9 . _ : / @ + -` (empty only when not `required`); InvalidRequest naming `param` otherwise."""
    if not isinstance(value, str):
        raise InvalidRequest(f"`{param}` must be a string, got {type(value).__name__}.", param)
    if len(value) > MAX_ID_CHARS:
        raise InvalidRequest(f"`{param}` must be at most {MAX_ID_CHARS} characters, got {len(value)}.", param)
    if required and not value:
        raise InvalidRequest(f"`{param}` must not be empty.", param)
    if not _ID_RE.fullmatch(value):
        raise InvalidRequest(
            f"`{param}` may only hold letters, digits and . _ : / @ + -, got {value[:40]!r}.", param
        )
    return value


def _as_ids(values, param: str) -> np.ndarray:
    """Token ids as a 1-D int64 array; InvalidRequest naming `param` for non-integers or negatives."""
    if isinstance(values, (list, tuple)) and values and all(type(v) is int for v in values):
        check_token_id_range(np.array([min(values), max(values)], dtype=object), param)  # before any cast
        return np.array(values, dtype=np.int64)
    try:
        arr = np.asarray(values)
        if arr.size == 0:
            return np.zeros((0,), dtype=np.int64)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError
    except (TypeError, ValueError):
        raise InvalidRequest(f"`{param}` must be a list of integer token ids.", param) from None
    check_token_id_range(arr, param)
    return arr.astype(np.int64, copy=False)


def _as_candidates(values, positions: int) -> np.ndarray | None:
    """Candidate ids as a (T, C) int64 array with T = `positions` and C >= 1, or None for none (None or an empty
    list); InvalidRequest naming `candidate_ids` otherwise."""
    if values is None:
        return None
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError):  # ragged rows
        arr = None
    if arr is not None and arr.size == 0:
        return None
    if arr is None or arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidRequest(
            "`candidate_ids` must be a (T, C) array of integer token ids: one list of C ids per position.",
            "candidate_ids",
        )
    if arr.shape[0] != positions:
        raise InvalidRequest(
            f"`candidate_ids` must have one row per completion position ({positions}), got {arr.shape[0]}.",
            "candidate_ids",
        )
    check_token_id_range(arr, "candidate_ids")
    return arr.astype(np.int64, copy=False)


@dataclass
class ScoreRequest:
    """One (prompt, completion) pair to score: the teacher returns log p(c_t | prompt, c_<t) per t."""

    prompt_token_ids: np.ndarray
    """(P,) int64 context ids, P >= 1."""
    completion_token_ids: np.ndarray
    """(T,) int64 ids to score, T >= 1."""
    request_id: str = ""
    """Client-chosen id echoed in the result (see `check_id`); the server does not deduplicate by it."""
    job_id: str = "default"
    """Student job: queueing, fairness and token scopes are per job (see `check_id`)."""
    top_k: int = 0
    """Most likely next tokens to return per position (0: none)."""
    full: bool = False
    """Return full vocabulary rows (bounded by the engine's memory guard)."""
    temperature: float = 1.0
    """Divides the logits before log_softmax; in [values.MIN_TEMPERATURE, values.MAX_TEMPERATURE]."""
    full_dtype: str = "float32"
    """Element type of full rows: float32, float16 or bfloat16."""
    timeout_ms: int = 0
    """Client deadline in ms (0: server default); expired requests are dropped, not scored."""
    candidate_ids: np.ndarray | None = None
    """(T, C) int64 ids whose logprobs to return per position (e.g. the student's top-C); None for none."""
    token_ranks: bool = False
    """Also return the 1-based rank of each completion token in the teacher's row (`ScoreResult.token_ranks`)."""
    sample_last: bool = False
    """The last completion token is a placeholder: the teacher draws the token there itself (a one-token
    generation) and scores that one (`ScoreResult.sampled_token_id`)."""
    greedy: bool = False
    """With `sample_last`: the most likely token instead of a draw at `temperature`."""
    seed: int | None = None
    """With `sample_last`: seed of the draw, in [0, 2^63); None for a random one."""
    keep_sequence: bool = False
    """Keep prompt + completion in the worker's prompt cache for requests whose prompt is exactly this sequence."""
    cache_scope: str = ""
    """Prompt-cache partition (the caller's tenant, set by the front-end): reuse only within one scope."""

    def __post_init__(self) -> None:
        check_id(self.request_id, "request_id", required=False)
        check_id(self.job_id, "job_id", required=True)
        self.prompt_token_ids = _as_ids(self.prompt_token_ids, "prompt_token_ids")
        self.completion_token_ids = _as_ids(self.completion_token_ids, "completion_token_ids")
        if self.prompt_token_ids.size == 0:
            raise InvalidRequest("`prompt_token_ids` must hold at least one token.", "prompt_token_ids")
        if self.completion_token_ids.size == 0:
            raise InvalidRequest(
                "`completion_token_ids` must hold at least one token.", "completion_token_ids"
            )
        self.top_k = check_count(self.top_k, "top_k")
        self.temperature = check_temperature(self.temperature)
        if not isinstance(self.full, (bool, np.bool_)):
            raise InvalidRequest(f"`full` must be true or false, got {self.full!r}.", "full")
        if not isinstance(self.full_dtype, str) or self.full_dtype not in codec.FLOAT_DTYPES:
            raise InvalidRequest(
                f"`full_dtype` must be one of {list(codec.FLOAT_DTYPES)}, got {self.full_dtype!r}.",
                "full_dtype",
            )
        self.timeout_ms = check_count(self.timeout_ms, "timeout_ms", MAX_INT64)
        self.candidate_ids = _as_candidates(self.candidate_ids, int(self.completion_token_ids.size))
        if not isinstance(self.cache_scope, str) or len(self.cache_scope) > MAX_ID_CHARS:
            raise InvalidRequest(
                f"`cache_scope` must be a string of at most {MAX_ID_CHARS} characters.", "cache_scope"
            )
        self._check_dialect_fields()

    def _check_dialect_fields(self) -> None:
        """The fields the vLLM dialect uses: booleans, a seed in range, no kept sequence with a placeholder."""
        for name in ("token_ranks", "sample_last", "greedy", "keep_sequence"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InvalidRequest(f"`{name}` must be true or false, got {getattr(self, name)!r}.", name)
        if self.seed is not None:
            self.seed = check_seed(self.seed)
        if self.sample_last and self.keep_sequence:
            raise InvalidRequest(
                "`keep_sequence` cannot be combined with `sample_last` (its last token is a placeholder).",
                "keep_sequence",
            )

    @property
    def num_tokens(self) -> int:
        """Prompt plus completion length: what the request costs in a batch's token budget."""
        return int(self.prompt_token_ids.size + self.completion_token_ids.size)

    @property
    def num_candidates(self) -> int:
        """C, the candidate ids per position (0: none)."""
        return 0 if self.candidate_ids is None else int(self.candidate_ids.shape[1])

    @staticmethod
    def _candidates_of(m: pb.ScoreRequest) -> np.ndarray | None:
        """The (T, C) candidate ids of a wire request (None for none); InvalidRequest naming the field."""
        C, n, T = m.num_candidates, len(m.candidate_ids), len(m.completion_token_ids)
        if C < 0:
            raise InvalidRequest(f"`num_candidates` must be >= 0, got {C}.", "num_candidates")
        if C == 0:
            if n:
                raise InvalidRequest(
                    f"`num_candidates` must be > 0 when `candidate_ids` holds ids, got 0 with {n} ids.",
                    "num_candidates",
                )
            return None
        if n != T * C:
            raise InvalidRequest(
                f"`candidate_ids` must hold completion positions x num_candidates = {T} x {C} = {T * C} ids, "
                f"got {n}.",
                "candidate_ids",
            )
        return np.array(m.candidate_ids, dtype=np.int64).reshape(T, C)

    @classmethod
    def from_pb(cls, m: pb.ScoreRequest) -> ScoreRequest:
        """Builds (and statically validates) a request from its wire form."""
        if m.full_dtype == pb.DTYPE_UNSPECIFIED:
            full_dtype = "float32"
        elif m.full_dtype in (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16):
            full_dtype = codec.dtype_name(m.full_dtype)
        else:
            full_dtype = f"enum {m.full_dtype}"  # rejected with the field named by __post_init__
        return cls(
            prompt_token_ids=np.array(m.prompt_token_ids, dtype=np.int64),
            completion_token_ids=np.array(m.completion_token_ids, dtype=np.int64),
            request_id=m.request_id,
            job_id=m.job_id or "default",
            top_k=m.top_k,
            full=m.full,
            temperature=m.temperature if m.HasField("temperature") else 1.0,  # an explicit 0 is refused
            full_dtype=full_dtype,
            timeout_ms=m.timeout_ms,
            candidate_ids=cls._candidates_of(m),
            token_ranks=m.token_ranks,
            sample_last=m.sample_last,
            greedy=m.greedy,
            seed=m.seed if m.HasField("seed") else None,
            keep_sequence=m.keep_sequence,
            cache_scope=m.cache_scope,
        )

    def to_pb(self) -> pb.ScoreRequest:
        """The wire form of this request."""
        return pb.ScoreRequest(
            request_id=self.request_id,
            job_id=self.job_id,
            prompt_token_ids=self.prompt_token_ids.tolist(),
            completion_token_ids=self.completion_token_ids.tolist(),
            top_k=self.top_k,
            full=self.full,
            temperature=self.temperature,
            full_dtype=codec.dtype_enum(self.full_dtype),
            timeout_ms=self.timeout_ms,
            candidate_ids=[] if self.candidate_ids is None else self.candidate_ids.ravel().tolist(),
            num_candidates=self.num_candidates,
            token_ranks=self.token_ranks,
            sample_last=self.sample_last,
            greedy=self.greedy,
            seed=self.seed,
            keep_sequence=self.keep_sequence,
            cache_scope=self.cache_scope,
        )


@dataclass
class ScoreResult:
    """The teacher's scores of one request, indexed by completion position t."""

    request_id: str
    token_logprobs: np.ndarray
    """(T,) float32."""
    top_k_ids: np.ndarray | None = None
    """(T, k) int32, most likely first; None when top_k = 0."""
    top_k_logprobs: np.ndarray | None = None
    """(T, k) float32; None when top_k = 0."""
    full_logprobs: np.ndarray | None = None
    """(T, V) in storage form of `full_dtype` (bfloat16 as raw uint16 bits); None unless asked."""
    full_dtype: str = "float32"
    candidate_logprobs: np.ndarray | None = None
    """(T, C) float32 logprobs at the request's `candidate_ids` (normalized over the vocabulary); None if none."""
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0
    worker_id: str = ""
    prompt_tokens_reused: int = 0
    """Prompt tokens whose keys/values were reused rather than computed for this request (prompt reuse)."""
    token_ranks: np.ndarray | None = None
    """(T,) int32 1-based rank of each completion token in the teacher's row; None unless asked."""
    sampled_token_id: int | None = None
    """The token drawn at the last position (`ScoreRequest.sample_last`); None otherwise."""

    def full_float32(self) -> np.ndarray | None:
        """The full rows widened to float32 (exact for every storage dtype)."""
        if self.full_logprobs is None:
            return None
        if self.full_dtype == "bfloat16" and self.full_logprobs.dtype == np.uint16:
            return codec.bf16_bits_to_float32(self.full_logprobs)
        return self.full_logprobs.astype(np.float32, copy=False)

    def to_pb(self) -> pb.ScoreResponse:
        """The wire form (arrays packed as `Tensor`)."""
        m = pb.ScoreResponse(
            request_id=self.request_id,
            queue_ms=self.queue_ms,
            compute_ms=self.compute_ms,
            batch_size=self.batch_size,
            worker_id=self.worker_id,
            prompt_tokens_reused=self.prompt_tokens_reused,
            sampled_token_id=self.sampled_token_id,
        )
        codec.encode(self.token_logprobs, "float32", out=m.token_logprobs)
        if self.token_ranks is not None:
            codec.encode(self.token_ranks, "int32", out=m.token_ranks)
        if self.top_k_ids is not None:
            codec.encode(self.top_k_ids, "int32", out=m.top_k_ids)
            codec.encode(self.top_k_logprobs, "float32", out=m.top_k_logprobs)
        if self.full_logprobs is not None:
            codec.encode(self.full_logprobs, self.full_dtype, out=m.full_logprobs)
        if self.candidate_logprobs is not None:
            codec.encode(self.candidate_logprobs, "float32", out=m.candidate_logprobs)
        return m

    def wire_parts(self) -> list:
        """The serialized ScoreResponse as pieces to concatenate (bytes and memoryviews): full rows are not
        copied into a protobuf message first (`codec.tensor_field_parts`)."""
        if self.full_logprobs is None:
            return [self.to_pb().SerializeToString()]
        head = replace(self, full_logprobs=None).to_pb().SerializeToString()
        number = pb.ScoreResponse.DESCRIPTOR.fields_by_name["full_logprobs"].number
        return [head, *codec.tensor_field_parts(number, self.full_logprobs, self.full_dtype)]

    @classmethod
    def from_pb(cls, m: pb.ScoreResponse) -> ScoreResult:
        """Decodes a response; bfloat16 full rows are kept as raw bits (see `full_float32`)."""
        has_topk = m.HasField("top_k_ids")
        has_full = m.HasField("full_logprobs")
        has_cand = m.HasField("candidate_logprobs")
        return cls(
            request_id=m.request_id,
            token_logprobs=codec.decode(m.token_logprobs),
            top_k_ids=codec.decode(m.top_k_ids) if has_topk else None,
            top_k_logprobs=codec.decode(m.top_k_logprobs) if has_topk else None,
            full_logprobs=codec.decode(m.full_logprobs, raw_bf16=True) if has_full else None,
            full_dtype=codec.dtype_name(m.full_logprobs.dtype) if has_full else "float32",
            candidate_logprobs=codec.decode(m.candidate_logprobs) if has_cand else None,
            queue_ms=m.queue_ms,
            compute_ms=m.compute_ms,
            batch_size=m.batch_size,
            worker_id=m.worker_id,
            prompt_tokens_reused=m.prompt_tokens_reused,
            token_ranks=codec.decode(m.token_ranks) if m.HasField("token_ranks") else None,
            sampled_token_id=m.sampled_token_id if m.HasField("sampled_token_id") else None,
        )


FLOP_DIM_FIELDS = ("n_layer", "d_attn", "layer_params", "head_params")


@dataclass
class ModelInfo:
    """What a client needs to know about a teacher before sending work (mirrors `teacher.v1.ModelInfo`).

    Built by `modelinfo.build_model_info` from an `EngineSpec` (the limits come from the teacher's settings)
    or decoded from the wire; it has no limits of its own.
    """

    model_id: str
    """Model folder or hub id the teacher loaded."""
    vocab_size: int
    """Rows of the output embedding: valid token ids are [0, vocab_size)."""
    max_context: int
    """Longest prompt + completion, in tokens."""
    backend: str
    """Scoring engine."""
    dtype: str
    """Weights dtype."""
    device: str
    """Device the engine runs on."""
    max_top_k: int
    """Largest accepted `top_k`."""
    max_full_elements: int
    """Memory guard: completion positions x vocab_size of a full-row request."""
    max_batch_tokens: int
    """Padded token budget of one batch (B x S); a single request must fit it alone."""
    max_pending_per_job: int
    """Requests one job may have queued before RESOURCE_EXHAUSTED."""
    supports_full: bool = True
    """Whether the engine can return full vocabulary rows at all."""
    max_candidates: int = 0
    """Largest accepted `num_candidates`; 0 when the backend cannot score candidate ids."""
    tokenizer_fingerprint: str = ""
    """sha256 of the vocabulary and special tokens (see `modelinfo.tokenizer_fingerprint`)."""
    eos_token_id: int = -1
    """End-of-sequence token id, or -1 if the tokenizer has none."""
    flop_dims: dict = field(default_factory=dict)
    """n_layer, d_attn, layer_params, head_params of the teacher (empty if unknown)."""

    def to_pb(self) -> pb.ModelInfo:
        return pb.ModelInfo(
            model_id=self.model_id,
            vocab_size=self.vocab_size,
            max_context=self.max_context,
            backend=self.backend,
            dtype=self.dtype,
            max_top_k=self.max_top_k,
            max_full_elements=self.max_full_elements,
            supports_full=self.supports_full,
            max_candidates=self.max_candidates,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            max_batch_tokens=self.max_batch_tokens,
            max_pending_per_job=self.max_pending_per_job,
            eos_token_id=self.eos_token_id,
            device=self.device,
            flop_dims=pb.FlopDims(**self.flop_dims) if self.flop_dims else None,
        )

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> ModelInfo:
        return cls(
            model_id=m.model_id,
            vocab_size=m.vocab_size,
            max_context=m.max_context,
            backend=m.backend,
            dtype=m.dtype,
            max_top_k=m.max_top_k,
            max_full_elements=m.max_full_elements,
            supports_full=m.supports_full,
            max_candidates=m.max_candidates,
            tokenizer_fingerprint=m.tokenizer_fingerprint,
            max_batch_tokens=m.max_batch_tokens,
            max_pending_per_job=m.max_pending_per_job,
            eos_token_id=m.eos_token_id,
            device=m.device,
            flop_dims={k: getattr(m.flop_dims, k) for k in FLOP_DIM_FIELDS} if m.flop_dims.n_layer else {},
        )
