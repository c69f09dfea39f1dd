from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT32: DType

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "job_id", "prompt_token_ids", "completion_token_ids", "top_k", "full", "temperature", "full_dtype", "timeout_ms", "candidate_ids", "num_candidates", "token_ranks", "sample_last", "greedy", "seed", "keep_sequence", "cache_scope")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    FULL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_RANKS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_LAST_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    KEEP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CACHE_SCOPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    job_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    completion_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    full: bool
    temperature: float
    full_dtype: DType
    timeout_ms: int
    candidate_ids: _containers.RepeatedScalarFieldContainer[int]
    num_candidates: int
    token_ranks: bool
    sample_last: bool
    greedy: bool
    seed: int
    keep_sequence: bool
    cache_scope: str
    def __init__(self, request_id: _Optional[str] = ..., job_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., completion_token_ids: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., full: _Optional[bool] = ..., temperature: _Optional[float] = ..., full_dtype: _Optional[_Union[DType, str]] = ..., timeout_ms: _Optional[int] = ..., candidate_ids: _Optional[_Iterable[int]] = ..., num_candidates: _Optional[int] = ..., token_ranks: _Optional[bool] = ..., sample_last: _Optional[bool] = ..., greedy: _Optional[bool] = ..., seed: _Optional[int] = ..., keep_sequence: _Optional[bool] = ..., cache_scope: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "token_logprobs", "top_k_ids", "top_k_logprobs", "full_logprobs", "queue_ms", "compute_ms", "batch_size", "error", "worker_id", "candidate_logprobs", "prompt_tokens_reused", "token_ranks", "sampled_token_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FULL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_REUSED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_RANKS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_logprobs: Tensor
    top_k_ids: Tensor
    top_k_logprobs: Tensor
    full_logprobs: Tensor
    queue_ms: float
    compute_ms: float
    batch_size: int
    error: Error
    worker_id: str
    candidate_logprobs: Tensor
    prompt_tokens_reused: int
    token_ranks: Tensor
    sampled_token_id: int
    def __init__(self, request_id: _Optional[str] = ..., token_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., top_k_ids: _Optional[_Union[Tensor, _Mapping]] = ..., top_k_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., full_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., worker_id: _Optional[str] = ..., candidate_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., prompt_tokens_reused: _Optional[int] = ..., token_ranks: _Optional[_Union[Tensor, _Mapping]] = ..., sampled_token_id: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "param", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: str
    param: str
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[str] = ..., param: _Optional[str] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "vocab_size", "max_context", "backend", "dtype", "max_top_k", "max_full_elements", "supports_full", "tokenizer_fingerprint", "max_batch_tokens", "max_pending_per_job", "eos_token_id", "device", "flop_dims", "max_candidates")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_FULL_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_FULL_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PENDING_PER_JOB_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FLOP_DIMS_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    vocab_size: int
    max_context: int
    backend: str
    dtype: str
    max_top_k: int
    max_full_elements: int
    supports_full: bool
    tokenizer_fingerprint: str
    max_batch_tokens: int
    max_pending_per_job: int
    eos_token_id: int
    device: str
    flop_dims: FlopDims
    max_candidates: int
    def __init__(self, model_id: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., backend: _Optional[str] = ..., dtype: _Optional[str] = ..., max_top_k: _Optional[int] = ..., max_full_elements: _Optional[int] = ..., supports_full: _Optional[bool] = ..., tokenizer_fingerprint: _Optional[str] = ..., max_batch_tokens: _Optional[int] = ..., max_pending_per_job: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., device: _Optional[str] = ..., flop_dims: _Optional[_Union[FlopDims, _Mapping]] = ..., max_candidates: _Optional[int] = ...) -> None: ...

class FlopDims(_message.Message):
    __slots__ = ("n_layer", "d_attn", "layer_params", "head_params")
    N_LAYER_FIELD_NUMBER: _ClassVar[int]
    D_ATTN_FIELD_NUMBER: _ClassVar[int]
    LAYER_PARAMS_FIELD_NUMBER: _ClassVar[int]
    HEAD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    n_layer: int
    d_attn: int
    layer_params: int
    head_params: int
    def __init__(self, n_layer: _Optional[int] = ..., d_attn: _Optional[int] = ..., layer_params: _Optional[int] = ..., head_params: _Optional[int] = ...) -> None: ...
