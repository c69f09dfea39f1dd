"""A tiny random Llama plus a BPE tokenizer trained locally: for tests, benchmarks and offline trials.

The tokenizer is trained deterministically on a built-in corpus, so two calls with different `seed`s give
two different models (a teacher and a student) that share one tokenizer (same fingerprint).
"""

from __future__ import annotations

import itertools
from pathlib import Path

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

_WORDS = (
    "the a an one two three four five six seven eight nine ten plus minus times equals answer question is what "
    "how many apples oranges books cats dogs birds has have had gives takes left right total sum product step "
    "first then next finally so therefore because we get result number numbers add subtract multiply divide "
    "student teacher learns model token prefix distill reason think carefully solve problem write"
).split()


def corpus() -> list[str]:
    """A small deterministic corpus: word sentences, arithmetic and every digit/letter/punctuation."""
    lines = []
    for i, (a, b) in enumerate(itertools.product(range(0, 40), range(0, 12))):
        w1, w2, w3 = _WORDS[i % len(_WORDS)], _WORDS[(i * 7) % len(_WORDS)], _WORDS[(i * 13) % len(_WORDS)]
        lines.append(f"Question: what is {a} + {b}? Answer: {a + b}.")
        lines.append(f"{w1} {w2} {w3}: {a} * {b} = {a * b}, {a} - {b} = {a - b}.")
    lines.append(
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}+-*/=<>#%&_\n"
    )
    return lines


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus()` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024, **SPECIAL)


def build_tiny(
    out: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    seed: int = 0,
    vocab_size: int = 512,
    init_std: float = 0.02,
    max_context: int = 1024,
    model_vocab: int | None = None,
) -> Path:
    """Writes a random LlamaForCausalLM + tokenizer to `out` (save_pretrained); returns the folder.

    `model_vocab` gives the embedding more rows than the tokenizer has tokens (as real models pad theirs),
    e.g. to make full vocabulary rows large in tests.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tokenizer = build_tokenizer(vocab_size)
    cfg = LlamaConfig(
        vocab_size=model_vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_context,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
