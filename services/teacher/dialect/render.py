"""The response of `POST /v1/completions` in vLLM's shape, from the scores of each prompt (scoring.py).

- `prompt_logprobs`: one entry per prompt token, null at position 0 (and before `prompt_logprob_start`); each maps
  the token-id string to `{"logprob", "rank", "decoded_token"}`, the actual token first with its true rank, then
  the top-k in rank order (k entries, or k + 1 when the actual token is outside the top-k), exactly as vLLM builds
  the dict (`vllm/logprobs.py: append_logprobs_for_next_position`: a top-k entry of the actual token overwrites
  its value in place, so it keeps the first key with the top-k rank).
- The legacy `logprobs` object (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) for `logprobs: N`, over
  the prompt too with `echo` (vLLM's `_create_completion_logprobs`).
- Floats are finite: -inf (and NaN, which a real teacher never gives) become -9999.0, as vLLM clamps them.
"""

from __future__ import annotations

import json
import time
import uuid
from functools import lru_cache

import numpy as np
import orjson

from services.teacher.dialect.request import CallPlan, PromptWork
from services.teacher.dialect.scoring import Generated, PromptScores

FLOOR = -9999.0
"""What vLLM writes for -inf."""


def clamp(x: float) -> float:
    return x if x >= FLOOR else FLOOR  # NaN fails the comparison too


class TokenTexts:
    """`decoded_token` of single ids as vLLM's `convert_ids_list_to_tokens` gives them: `decode([id])`, with the
    leading spaces that decode strips restored for Metaspace (SentencePiece) vocabularies. Cached."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.marker = _space_marker(tokenizer)
        self.text = lru_cache(maxsize=1 << 17)(self._text)
        self._corrected = lru_cache(maxsize=1 << 16)(self._correct)

    def at(self, token_id: int, context: tuple[int, ...]) -> str:
        """The text of `token_id` after the actual tokens `context` (at most 4, oldest first): a token that
        decodes to an unfinished UTF-8 sequence ("...\ufffd") is corrected with them, as vLLM's
        `LogprobsProcessor._correct_decoded_token` does ("" while the sequence is still unfinished)."""
        text = self.text(token_id)
        return self._corrected(token_id, context) if text.endswith("\ufffd") else text

    def _correct(self, token_id: int, context: tuple[int, ...]) -> str:
        decode = self.tokenizer.decode
        for num in range(1, min(len(context), 4) + 1):
            ctx = list(context[-num:])
            full = decode(ctx + [token_id])
            if full.endswith("\ufffd"):
                continue
            clean_end = len(ctx)
            for j in range(len(ctx) - 1, -1, -1):
                if not decode([ctx[j]]).endswith("\ufffd"):
                    break
                clean_end = j
            prefix = decode(ctx[:clean_end]) if clean_end > 0 else ""
            if full.startswith(prefix):
                return full[len(prefix) :]
            common = 0
            for a, b in zip(prefix, full):  # noqa: B905 (a common prefix)
                if a != b:
                    break
                common += 1
            return full[common:]
        return ""

    def _text(self, token_id: int) -> str:
        text = self.tokenizer.decode([token_id]) or ""
        if self.marker is None:
            return text
        raw = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        markers = len(raw) - len(raw.lstrip(self.marker))
        missing = markers - (len(text) - len(text.lstrip(" ")))
        return " " * missing + text if missing > 0 else text


def _space_marker(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    for p in [pre, *pre.get("pretokenizers", [])]:
        if p.get("type") == "Metaspace":
            return p.get("replacement", "▁")
    return None


def position_entry(
    texts: TokenTexts, actual: int, lp: float, rank: int, top_ids, top_lps, context=()
) -> dict:
    """One `prompt_logprobs` entry: the actual token first, then the top-k (ids and logprobs as lists);
    `context` the actual tokens before it (for vLLM's UTF-8 correction of decoded tokens)."""
    entry = {str(actual): {"logprob": clamp(lp), "rank": rank, "decoded_token": texts.at(actual, context)}}
    for r, (i, v) in enumerate(zip(top_ids, top_lps, strict=True), 1):
        entry[str(i)] = {"logprob": clamp(v), "rank": r, "decoded_token": texts.at(i, context)}
    return entry


def _top_of_row(s: PromptScores, i: int, k: int) -> tuple[list, list]:
    """The top-k (ids, logprobs) of position i: from the whole row when k is -1, else the returned top-k."""
    if k == -1:
        row = s.full_NV[i]
        order = np.argsort(-row, kind="stable")
        return order.tolist(), row[order].tolist()
    return s.top_ids_NK[i, :k].tolist(), s.top_lp_NK[i, :k].tolist()


def prompt_logprobs(texts: TokenTexts, p: PromptWork, s: PromptScores, k: int) -> list[dict | None]:
    out: list[dict | None] = [None] * p.start
    lp, rank = s.lp_N.tolist(), s.rank_N.tolist()
    for i in range(p.start, len(p.ids)):
        ids, lps = _top_of_row(s, i, k)
        context = tuple(p.ids[max(1, i - 4) : i])  # vLLM's: the last 4 scored positions' actual tokens
        out.append(position_entry(texts, p.ids[i], lp[i], rank[i], ids, lps, context))
    return out


def candidate_logprobs(p: PromptWork, s: PromptScores) -> list[list[float | None]]:
    """`prompt_token_id_logprobs`: per row of `prompt_logprob_token_ids`, the logprob of each id (null at -1)."""
    rows = s.cand_lp_NC[p.start : len(p.ids)]
    return [
        [clamp(v) if i >= 0 else None for i, v in zip(ids, vals, strict=True)]
        for ids, vals in zip(p.candidates.tolist(), rows.tolist(), strict=True)
    ]


def _gen_entry(texts: TokenTexts, g: Generated, k: int, context: tuple[int, ...]) -> dict:
    top = g.top_ids[:k].tolist(), g.top_lps[:k].tolist()
    return position_entry(texts, g.token_id, g.logprob, g.rank, *top, context)


class _Legacy:
    """The legacy `logprobs` object, built token by token as vLLM's `_create_completion_logprobs` does."""

    def __init__(self, texts: TokenTexts, n: int, as_ids: bool) -> None:
        self.texts, self.n, self.as_ids = texts, n, as_ids
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict | None] = []
        self.text_offset: list[int] = []

    def _name(self, token_id: int, decoded: str) -> str:
        return f"token_id:{token_id}" if self.as_ids else decoded

    def add(self, token_id: int, entry: dict | None) -> None:
        if entry is None:
            token = self._name(token_id, self.texts.tokenizer.decode(token_id))
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
        else:
            own = entry[str(token_id)]
            token = self._name(token_id, own["decoded_token"])
            self.token_logprobs.append(own["logprob"])
            self.top_logprobs.append(
                {
                    self._name(int(i), v["decoded_token"]): v["logprob"]
                    for j, (i, v) in enumerate(entry.items())
                    if self.n == -1 or self.n >= j
                }
            )
        start = self.text_offset[-1] + len(self.tokens[-1]) if self.tokens else 0
        self.text_offset.append(start)
        self.tokens.append(token)

    def body(self) -> dict:
        return {
            "text_offset": self.text_offset,
            "token_logprobs": self.token_logprobs,
            "tokens": self.tokens,
            "top_logprobs": self.top_logprobs,
        }


def legacy_logprobs(texts, plan: CallPlan, p: PromptWork, s: PromptScores, entries) -> dict | None:
    """`choices[i].logprobs`: None without `logprobs`; over the prompt (its entries) too with `echo`."""
    if plan.sample_logprobs is None:
        return None
    out = _Legacy(texts, plan.sample_logprobs, plan.as_token_ids)
    if plan.echo:
        for i, tid in enumerate(p.ids):
            out.add(tid, entries[i] if entries is not None else None)
    gen = [g.token_id for g in s.generated]
    for j, g in enumerate(s.generated):  # context: the tokens generated before it
        out.add(g.token_id, _gen_entry(texts, g, plan.sample_logprobs, tuple(gen[max(0, j - 4) : j])))
    return out.body()


def choice(index: int, texts: TokenTexts, plan: CallPlan, p: PromptWork, s: PromptScores) -> dict:
    entries = prompt_logprobs(texts, p, s, plan.top_k) if plan.top_k is not None else None
    gen_ids = [g.token_id for g in s.generated]
    text = texts.tokenizer.decode(gen_ids, skip_special_tokens=True) if gen_ids else ""
    if plan.echo:
        prompt_text = p.text if p.text is not None else texts.tokenizer.decode(p.ids)
        text = ("" if plan.return_token_ids else prompt_text) + text
    out = {
        "index": index,
        "text": text,
        "logprobs": legacy_logprobs(texts, plan, p, s, entries),
        "finish_reason": s.finish_reason or "length",
        "stop_reason": None,
        "token_ids": gen_ids if plan.return_token_ids else None,
        "prompt_logprobs": entries,
        "prompt_token_ids": p.ids if plan.return_token_ids else None,
        "routed_experts": None,
    }
    if p.candidates is not None:
        out["prompt_token_id_logprobs"] = candidate_logprobs(p, s)
    return out


def completion_body(model: str, texts: TokenTexts, plan: CallPlan, scores: list[PromptScores]) -> dict:
    """The whole response: OpenAI's envelope, one choice per prompt in order, and usage (`cached_tokens`: prompt
    tokens whose keys/values were reused rather than computed)."""
    prompt_tokens = sum(len(p.ids) for p in plan.prompts)
    generated = sum(len(s.generated) for s in scores)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            choice(i, texts, plan, p, s) for i, (p, s) in enumerate(zip(plan.prompts, scores, strict=True))
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + generated,
            "completion_tokens": generated,
            "prompt_tokens_details": {"cached_tokens": sum(s.reused for s in scores)},
        },
    }


def render(body: dict) -> bytes:
    """The bytes of a response (orjson: ~10x the standard encoder on these nested dicts)."""
    return orjson.dumps(body)
