"""The body of `POST /v1/completions` in vLLM's dialect, its checks, and what each prompt of a call asks for.

Field names, defaults and over-limit messages are vLLM's (`vllm/entrypoints/openai/completion/protocol.py`,
`vllm/sampling_params.py`), because clients match on them; unknown keys are ignored, as vLLM does (axolotl and
verl send extra ones). Types are strict, as on the native API: `"prompt_logprobs": "3"` is refused naming the
field. Model-dependent limits are checked here against `ModelInfo` before anything is queued, then again by
`validation.validate_request` on every ScoreRequest built from the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.teacher.errors import InvalidRequest
from services.teacher.types import ModelInfo, check_id
from services.teacher.values import Seed, TokenIds, check_temperature, parse_json

DEFAULT_MAX_TOKENS = 16
"""vLLM's default `max_tokens` for completions."""
MAX_GENERATED_TOKENS = 64
"""Most tokens one choice may generate: each is a step through the queue (this teacher scores; it is no
generation server)."""


class CompletionBody(BaseModel):
    """The fields of vLLM's CompletionRequest that this teacher reads (the rest are ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: TokenIds | list[TokenIds] | str | list[str] = Field(
        description="Token ids, a list of token-id lists, a string or a list of strings: one choice each."
    )
    model: str | None = Field(None, description="Absent, or the served model's name.")
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, description="Tokens to generate per prompt (0: none).")
    temperature: float | None = Field(
        None, description="Divides the logits before log_softmax (vLLM's processed_logprobs); 0: greedy."
    )
    prompt_logprobs: int | None = Field(
        None, description="Per prompt position: the actual token and the top k (0: the actual only; -1: all)."
    )
    logprobs: int | None = Field(
        None, description="Top logprobs of each generated (or, with echo, each) token."
    )
    echo: bool | None = Field(False, description="Return the prompt in `text` and `logprobs` too.")
    return_tokens_as_token_ids: bool | None = Field(None, description="Tokens as 'token_id:<id>' strings.")
    return_token_ids: bool | None = Field(
        None, description="Add `prompt_token_ids` and `token_ids` to each choice."
    )
    add_special_tokens: bool = Field(True, description="Add the tokenizer's special tokens to a text prompt.")
    user: str | None = Field(None, description="OpenAI's end-user id: the job, unless the token names one.")
    stream: bool | None = Field(False, description="Not supported: refused with a 400.")
    n: int | None = Field(1, description="Choices per prompt: 1 only.")
    seed: Seed | None = Field(
        None,
        description="Seed of the generated tokens' draws, in [0, 2^63) (another is refused, not wrapped).",
    )
    ignore_eos: bool = Field(False, description="Generate past the end-of-sequence token.")
    prompt_logprob_token_ids: list[list[int]] | list[list[list[int]]] | None = Field(
        None,
        description="Extension (vLLM PR #54335): per scored prompt position, the ids whose logprobs to return "
        "(-1 pads a row); one such list of rows per prompt when the call has several.",
    )
    prompt_logprob_start: int | None = Field(
        None, description="Extension: the first prompt position to score (earlier entries are null)."
    )


def parse_body(raw: bytes) -> CompletionBody:
    """The body of a call; InvalidRequest naming the first bad field (or `body` for malformed JSON)."""
    # the standard parser keeps a lone surrogate, so that the check of `prompt` can name it
    return body_of(parse_json(raw))


def body_of(data) -> CompletionBody:
    """The body of a call from its parsed JSON; InvalidRequest naming the first bad field."""
    if not isinstance(data, dict):
        raise InvalidRequest("`body` must be a JSON object.", "body")
    try:
        return CompletionBody.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if not isinstance(p, int)]
        param = loc[0] if loc else "body"
        if first.get("type") in ("json_invalid", "model_type"):
            param = "body"
        raise InvalidRequest(f"`{param}`: {first.get('msg', 'invalid value')}.", param) from None


@dataclass
class PromptWork:
    """What one prompt of a call asks for."""

    ids: list[int]
    """The prompt's token ids (n >= 1)."""
    text: str | None
    """The prompt as given, when it was text (echoed as it is)."""
    start: int
    """First scored position (>= 1); n when no position is scored."""
    candidates: np.ndarray | None
    """(n - start, C) int64 ids to score per scored position, -1 for padding; None for none."""


@dataclass
class CallPlan:
    """One call: its prompts and the choices' common settings."""

    prompts: list[PromptWork]
    top_k: int | None
    """Prompt logprobs asked: None (none), 0 (the actual token only), k, or -1 (the whole vocabulary)."""
    sample_logprobs: int | None
    """Top logprobs of each generated token (`logprobs`), None for none."""
    max_tokens: int
    temperature: float
    greedy: bool
    echo: bool
    as_token_ids: bool
    return_token_ids: bool
    seed: int | None
    ignore_eos: bool

    @property
    def scores_prompt(self) -> bool:
        return self.top_k is not None or any(p.candidates is not None for p in self.prompts)

    @property
    def row_k(self) -> int:
        """The top-k each scored row needs (prompt positions and generated tokens alike)."""
        return max(self.top_k or 0, self.sample_logprobs or 0, 0)


class ModelNotFound(InvalidRequest):
    """`model` names another model than the served one (vLLM answers 404: errors.HTTP_STATUS)."""

    code = "NOT_FOUND"


def vllm_error(message: str, param: str, value=None) -> InvalidRequest:
    """A refusal vLLM also makes, in its words with its `(parameter=..., value=...)` tail (clients match on it)."""
    tail = f"parameter={param}" + ("" if value is None else f", value={value}")
    return InvalidRequest(f"{message} ({tail})", param)


def over_limit(kind: str, asked: int, allowed: int, param: str) -> InvalidRequest:
    return vllm_error(
        f"Requested {kind} logprobs of {asked}, which is greater than max allowed: {allowed}", param, asked
    )


def _tokenize(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequest(
            f"`prompt` must be valid Unicode: it holds a lone surrogate at character {err.start}.", "prompt"
        ) from None
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def prompt_ids(body: CompletionBody, tokenizer, info: ModelInfo) -> list[tuple[list[int], str | None]]:
    """(token ids, text or None) of each prompt, in order; InvalidRequest naming `prompt`."""
    p = body.prompt
    if isinstance(p, str):
        items = [p]
    elif not p:
        raise InvalidRequest("`prompt` must not be empty.", "prompt")
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    out = []
    for item in items:
        text = item if isinstance(item, str) else None
        ids = _tokenize(tokenizer, item, body.add_special_tokens) if text is not None else list(item)
        if not ids:
            raise InvalidRequest("`prompt` must hold at least one token.", "prompt")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= info.vocab_size:
            bad = lo if lo < 0 else hi
            raise InvalidRequest(
                f"`prompt` token ids must be in [0, vocab_size {info.vocab_size}), got {bad}.", "prompt"
            )
        out.append((ids, text))
    return out


def _top_k(body: CompletionBody, info: ModelInfo) -> int | None:
    """The prompt logprobs asked (echo with `logprobs` implies them, as in vLLM), within the limits."""
    k = body.prompt_logprobs
    if k is None and body.echo and body.logprobs is not None:
        k = body.logprobs
    if k is None:
        return None
    if k < -1:
        raise vllm_error("`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs", k)
    if k == -1 and not info.supports_full:
        raise over_limit("prompt", info.vocab_size, info.max_top_k, "prompt_logprobs")
    if k > info.max_top_k:
        raise over_limit("prompt", k, info.max_top_k, "prompt_logprobs")
    return k


def _sample_logprobs(body: CompletionBody, info: ModelInfo) -> int | None:
    n = body.logprobs
    if n is None:
        return None
    if n < -1:
        raise vllm_error("`logprobs` must be a positive value or -1.", "logprobs", n)
    asked = info.vocab_size if n == -1 else n
    if asked > info.max_top_k:
        raise over_limit("sample", asked, info.max_top_k, "logprobs")
    return n


def _check_call(body: CompletionBody, served: set[str]) -> int:
    """The checks that need no prompt; returns max_tokens."""
    if body.model is not None and body.model not in served:
        raise ModelNotFound(f"The model `{body.model}` does not exist.", "model")
    if body.stream:
        if body.prompt_logprobs is not None:
            raise vllm_error("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
        raise InvalidRequest("`stream` is not supported by this teacher; send `stream: false`.", "stream")
    if body.n not in (None, 1):
        raise InvalidRequest(f"`n` must be 1 (one choice per prompt), got {body.n}.", "n")
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if not 0 <= max_tokens <= MAX_GENERATED_TOKENS:
        raise InvalidRequest(
            f"`max_tokens` must be in [0, {MAX_GENERATED_TOKENS}] (this teacher scores; each generated token is "
            f"a step through its queue), got {max_tokens}.",
            "max_tokens",
        )
    if body.prompt_logprob_start is not None and body.prompt_logprob_start < 0:
        raise vllm_error(
            "prompt_logprob_start must be non-negative.", "prompt_logprob_start", body.prompt_logprob_start
        )
    return max_tokens


def _temperature(body: CompletionBody) -> tuple[float, bool]:
    """(temperature applied to the logits, greedy): vLLM's 0 is greedy, its logprobs on the raw logits."""
    t = 1.0 if body.temperature is None else check_temperature(body.temperature, zero_ok=True)
    if t == 0.0:
        return 1.0, True
    return t, False


def _candidates(body: CompletionBody, n_prompts: int) -> list[list[list[int]] | None]:
    """`prompt_logprob_token_ids` per prompt: rows as given for one prompt, one list of rows each for several."""
    c = body.prompt_logprob_token_ids
    if c is None:
        return [None] * n_prompts
    nested = bool(c) and bool(c[0]) and isinstance(c[0][0], list)
    if n_prompts == 1 and not nested:
        return [c]  # type: ignore[list-item]
    if not nested or len(c) != n_prompts:
        raise InvalidRequest(
            f"`prompt_logprob_token_ids` must hold one list of rows per prompt ({n_prompts}) when a call has "
            "several prompts.",
            "prompt_logprob_token_ids",
        )
    return list(c)  # type: ignore[arg-type]


def _candidate_rows(rows: list[list[int]] | None, positions: int, info: ModelInfo) -> np.ndarray | None:
    """(positions, C) int64 candidate ids of one prompt (-1 pads a row); InvalidRequest naming the field."""
    param = "prompt_logprob_token_ids"
    if rows is None:
        return None
    width = max((len(r) for r in rows), default=0)
    if len(rows) != positions or width == 0:
        raise InvalidRequest(
            f"`{param}` must hold one non-empty row of ids per scored prompt position ({positions}), "
            f"got {len(rows)} rows.",
            param,
        )
    if width > info.max_candidates:
        raise InvalidRequest(
            f"`{param}` must hold at most {info.max_candidates} ids per row (max_candidates), got {width}.",
            param,
        )
    ids = np.full((positions, width), -1, dtype=np.int64)
    for t, r in enumerate(rows):
        ids[t, : len(r)] = r
    if ids.min() < -1 or ids.max() >= info.vocab_size:
        raise InvalidRequest(
            f"`{param}` contain out-of-vocab token ids (-1 pads a row). Vocabulary size: {info.vocab_size}",
            param,
        )
    return ids


def _work(
    ids, text, rows, body: CompletionBody, max_tokens: int, info: ModelInfo, scores: bool
) -> PromptWork:
    n = len(ids)
    if n + max_tokens > info.max_context:
        raise InvalidRequest(
            f"This model's maximum context length is {info.max_context} tokens. However, you requested "
            f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion).",
            "prompt",
        )
    start = max(1, body.prompt_logprob_start or 1) if scores or rows is not None else n
    start = min(start, n)
    return PromptWork(ids, text, start, _candidate_rows(rows, n - start, info))


def plan_call(body: CompletionBody, tokenizer, info: ModelInfo, served: set[str]) -> CallPlan:
    """What a call asks for, every limit checked; InvalidRequest (with vLLM's messages) naming the field."""
    max_tokens = _check_call(body, served)
    top_k, sample_logprobs = _top_k(body, info), _sample_logprobs(body, info)
    temperature, greedy = _temperature(body)
    if body.user is not None:
        check_id(body.user, "user", required=True)
    given = prompt_ids(body, tokenizer, info)
    rows = _candidates(body, len(given))
    prompts = [
        _work(ids, text, r, body, max_tokens, info, top_k is not None)
        for (ids, text), r in zip(given, rows, strict=True)
    ]
    if top_k == -1:
        _check_full(prompts, info)
    return CallPlan(
        prompts=prompts,
        top_k=top_k,
        sample_logprobs=sample_logprobs,
        max_tokens=max_tokens,
        temperature=temperature,
        greedy=greedy,
        echo=bool(body.echo),
        as_token_ids=bool(body.return_tokens_as_token_ids),
        return_token_ids=bool(body.return_token_ids),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


def _check_full(prompts: list[PromptWork], info: ModelInfo) -> None:
    """`prompt_logprobs: -1` returns the whole vocabulary per position: within the full-row memory guard."""
    for p in prompts:
        elements = (len(p.ids) - p.start) * info.vocab_size
        if elements > info.max_full_elements:
            raise InvalidRequest(
                f"`prompt_logprobs` -1 needs prompt positions x vocab = {elements} entries, over the memory "
                f"guard of {info.max_full_elements}; ask for a top k instead.",
                "prompt_logprobs",
            )
