"""Model-dependent request checks (stage two): limits that need `ModelInfo`.

Stage one (shapes, signs, dtypes, temperature) runs when a `ScoreRequest` is built. These run in the
front-end before a request is queued, and again in the engine so an in-process caller is protected too.
Messages name the field and the limit: "`top_k` must be <= 64, got 100."
"""

from __future__ import annotations

from services.teacher.errors import InvalidRequest
from services.teacher.types import ModelInfo, ScoreRequest


def validate_request(req: ScoreRequest, info: ModelInfo) -> None:
    """Raises InvalidRequest (with `param`) if `req` exceeds a limit of the model described by `info`."""
    for param, ids in (
        ("prompt_token_ids", req.prompt_token_ids),
        ("completion_token_ids", req.completion_token_ids),
    ):
        top = int(ids.max())
        if top >= info.vocab_size:
            raise InvalidRequest(
                f"`{param}` must be < vocab_size {info.vocab_size}, got token id {top}.", param
            )
    if req.num_tokens > info.max_context:
        raise InvalidRequest(
            f"`completion_token_ids` plus `prompt_token_ids` must be <= max_context {info.max_context} "
            f"tokens, got {req.num_tokens}.",
            "completion_token_ids",
        )
    if req.top_k > info.max_top_k:
        raise InvalidRequest(f"`top_k` must be <= {info.max_top_k}, got {req.top_k}.", "top_k")
    if req.top_k > info.vocab_size:
        raise InvalidRequest(f"`top_k` must be <= vocab_size {info.vocab_size}, got {req.top_k}.", "top_k")
    if req.full:
        if not info.supports_full:
            raise InvalidRequest(f"`full` rows are not supported by the {info.backend!r} backend.", "full")
        elements = int(req.completion_token_ids.size) * info.vocab_size
        if elements > info.max_full_elements:
            raise InvalidRequest(
                f"`full` rows need completion positions x vocab = {elements} elements, over the memory "
                f"guard of {info.max_full_elements}; send a shorter completion or use top_k.",
                "full",
            )
    if req.candidate_ids is not None:
        _validate_candidates(req, info)
    if req.num_tokens > info.max_batch_tokens:
        raise InvalidRequest(
            f"`completion_token_ids` plus `prompt_token_ids` must be <= max_batch_tokens "
            f"{info.max_batch_tokens}, got {req.num_tokens}.",
            "completion_token_ids",
        )


def _validate_candidates(req: ScoreRequest, info: ModelInfo) -> None:
    """`num_candidates` within the teacher's limit, every candidate id inside the vocabulary."""
    C = req.num_candidates
    if info.max_candidates < 1:
        raise InvalidRequest(
            f"`candidate_ids` are not supported by the {info.backend!r} backend (it scores only its own "
            "top-k); use top_k, or the hf backend.",
            "candidate_ids",
        )
    if C > info.max_candidates:
        raise InvalidRequest(
            f"`candidate_ids` must hold at most {info.max_candidates} ids per position (max_candidates), "
            f"got {C}.",
            "candidate_ids",
        )
    top = int(req.candidate_ids.max())
    if top >= info.vocab_size:
        raise InvalidRequest(
            f"`candidate_ids` must be < vocab_size {info.vocab_size}, got token id {top}.", "candidate_ids"
        )
