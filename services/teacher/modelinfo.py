"""Describes a model without loading its weights: `ModelInfo` from its config and tokenizer.

The front-end needs the vocabulary size, context length and tokenizer fingerprint to validate requests
before they are queued, but must not pay for the weights; workers build the same description.
"""

from __future__ import annotations

import hashlib
import json

from services.teacher.spec import EngineSpec
from services.teacher.types import ModelInfo

NO_FULL_ROWS = frozenset({"vllm"})
"""Backends that cannot return full vocabulary rows (ModelInfo.supports_full is false for them)."""
NO_CANDIDATES = frozenset({"vllm"})
"""Backends that cannot score arbitrary candidate ids, only their own top-k (ModelInfo.max_candidates is 0)."""


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id, added tokens included) and the special tokens.

    Two tokenizers with the same fingerprint map every text to the same ids; a student and a teacher must
    agree on it, or per-token distillation silently compares different tokens.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = {
        name: str(getattr(tokenizer, name, None))
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    special["all"] = sorted(str(t) for t in tokenizer.all_special_tokens)
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def vocab_size_of(config) -> int:
    """Rows of the output embedding, i.e. the size of the logit vector."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


def max_context_of(config, tokenizer) -> int:
    """Longest sequence the model accepts: max_position_embeddings (capped by a sane tokenizer limit)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = int(getattr(text_config, "max_position_embeddings", 0) or 0)
    tok_max = int(getattr(tokenizer, "model_max_length", 0) or 0)
    if 0 < tok_max < 10**7 and (n == 0 or tok_max < n):
        n = tok_max
    return n or 2048


def build_model_info(spec: EngineSpec, config, tokenizer) -> ModelInfo:
    """ModelInfo of the engine `spec` describes, from the model's config and tokenizer (no weights needed)."""
    eos = tokenizer.eos_token_id
    try:
        from services.models.dims import flop_dims_from_config

        dims = flop_dims_from_config(config)
    except Exception:  # noqa: BLE001 - an architecture we cannot instantiate: FLOPs unknown, scoring unaffected
        dims = {}
    limits = spec.limits
    return ModelInfo(
        model_id=spec.model,
        vocab_size=vocab_size_of(config),
        max_context=max_context_of(config, tokenizer),
        backend=spec.backend,
        dtype=spec.dtype,
        device=spec.device,
        max_top_k=limits.max_top_k,
        max_candidates=0 if spec.backend in NO_CANDIDATES else limits.max_candidates,
        max_full_elements=limits.max_full_elements,
        max_batch_tokens=limits.max_batch_tokens,
        max_pending_per_job=limits.max_pending_per_job,
        supports_full=spec.backend not in NO_FULL_ROWS,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        eos_token_id=-1 if eos is None else int(eos),
        flop_dims=dims,
    )


def load_config_and_tokenizer(model: str):
    """(config, tokenizer) of a model folder or hub id, without weights."""
    from transformers import AutoConfig, AutoTokenizer

    return AutoConfig.from_pretrained(model), AutoTokenizer.from_pretrained(model)


def describe(spec: EngineSpec):
    """(ModelInfo, tokenizer) of the engine `spec` describes, without loading its weights: what a front-end
    needs."""
    config, tokenizer = load_config_and_tokenizer(spec.model)
    return build_model_info(spec, config, tokenizer), tokenizer
