"""The text-level scoring contract shared by `POST /v1/logprobs` and `prefix-distill score`.

Both must print the same JSON for the same input, so the resolution of text or ids and the body builder
live here, once. Text is tokenized without special tokens, prompt and completion separately.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from services.teacher.errors import InvalidRequest
from services.teacher.types import ScoreResult
from services.teacher.values import check_text


def resolve_ids(
    tokenizer, prompt, prompt_token_ids, completion, completion_token_ids
) -> tuple[list[int], list[int]]:
    """Token ids from exactly one of text / ids for each side; InvalidRequest naming the field otherwise."""

    def one(text, ids, text_name: str, ids_name: str) -> list[int]:
        if (text is None) == (ids is None):
            raise InvalidRequest(f"exactly one of `{text_name}` and `{ids_name}` must be given.", text_name)
        if text is not None:
            if not isinstance(text, str):
                raise InvalidRequest(f"`{text_name}` must be a string.", text_name)
            check_text(text, text_name)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise InvalidRequest(
                    f"`{text_name}` must not be empty (it tokenizes to no tokens).", text_name
                )
            return ids
        return list(ids)

    return (
        one(prompt, prompt_token_ids, "prompt", "prompt_token_ids"),
        one(completion, completion_token_ids, "completion", "completion_token_ids"),
    )


class TokenTexts:
    """Decoded text of single token ids, cached (top-k lists repeat the same ids constantly)."""

    def __init__(self, tokenizer) -> None:
        self._decode = lru_cache(maxsize=1 << 16)(lambda i: tokenizer.decode([i]))

    def __call__(self, token_id: int) -> str:
        return self._decode(int(token_id))


def _entries(texts: TokenTexts, ids_TK, lp_TK, t: int) -> list[dict]:
    """`{"token_id", "token", "logprob"}` of row t of (T, K) ids and logprobs (nested lists)."""
    return [
        {"token_id": i, "token": texts(i), "logprob": v} for i, v in zip(ids_TK[t], lp_TK[t], strict=True)
    ]


def logprobs_body(
    model_id: str, texts: TokenTexts, prompt_ids, completion_ids, result: ScoreResult, candidate_ids=None
) -> dict:
    """The response body of `POST /v1/logprobs` (DESIGN.md contract), one entry per completion token; with
    `candidate_ids` (T, C) each entry also lists them, in the order given, under `candidates`."""
    lp = result.token_logprobs.tolist()
    top_ids = result.top_k_ids.tolist() if result.top_k_ids is not None else None
    top_lp = result.top_k_logprobs.tolist() if result.top_k_logprobs is not None else None
    has_cand = candidate_ids is not None and result.candidate_logprobs is not None
    cand_ids = np.asarray(candidate_ids).tolist() if has_cand else None
    cand_lp = result.candidate_logprobs.tolist() if has_cand else None
    tokens = []
    for t, tid in enumerate(np.asarray(completion_ids).tolist()):
        top = _entries(texts, top_ids, top_lp, t) if top_ids is not None else []
        entry = {"token_id": tid, "token": texts(tid), "logprob": lp[t], "top": top}
        if has_cand:
            entry["candidates"] = _entries(texts, cand_ids, cand_lp, t)
        tokens.append(entry)
    return {"model": model_id, "prompt_token_ids": [int(i) for i in prompt_ids], "tokens": tokens}


def render_json(body: dict) -> str:
    """The exact bytes both the HTTP API and the CLI emit (compact, like FastAPI's JSONResponse)."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
