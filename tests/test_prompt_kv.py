"""Prompt reuse (engine/prompt_kv.py): requests that share a prompt, in one batch or across batches, score what
an unpadded, uncached transformers forward of each whole sequence gives; the prompt is computed once; the LRU
keeps to its byte bound; reuse off (or a request seen first) is bit for bit the plain padded pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import TOL_F32, assert_matches_reference, ragged_requests

from services.teacher.engine import load_engine
from services.teacher.engine.prompt_kv import PromptLRU, PromptState, prompt_key, supports_reuse
from services.teacher.types import ScoreRequest


@pytest.fixture(scope="module")
def reference_model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


def shared_prompt_requests(vocab: int, seed: int, **kw) -> list[ScoreRequest]:
    """3 prompts (1, ~12 and ~29 tokens) x 4 samples of 1..16 tokens, interleaved as two jobs would send them."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, n) for n in (1, 12, 29)]
    reqs = []
    for s in range(4):
        for j, p in enumerate(prompts):
            t = 1 if (s, j) == (1, 1) else int(rng.integers(2, 17))
            reqs.append(ScoreRequest(p, rng.integers(0, vocab, t), request_id=f"p{j}s{s}", **kw))
    return reqs


@pytest.mark.parametrize("flat", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("kw", [{}, {"top_k": 5, "temperature": 0.8, "full": True}])
def test_shared_prompts_match_a_plain_forward(tiny_teacher, reference_model, kw, flat):
    engine = load_engine(str(tiny_teacher), prompt_cache_mb=16)
    assert engine.flat_reuse  # a Llama hands keyword arguments down to attention
    engine.flat_reuse = flat  # False: reused requests in padded passes of similar lengths
    reqs = shared_prompt_requests(engine.info.vocab_size, seed=3, **kw)
    worst = 0.0
    for call in range(2):  # the second call finds every prompt in the LRU
        results = engine.score(reqs)
        for req, res in zip(reqs, results, strict=True):
            worst = max(worst, assert_matches_reference(reference_model, req, res, TOL_F32))
        expected = [0 if call == 0 and r.request_id.endswith("s0") else r.prompt_token_ids.size for r in reqs]
        assert engine.last_reused == expected
    assert (engine.prompts.misses, engine.prompts.hits, len(engine.prompts)) == (3, 3, 3)
    assert engine.flat_reuse == flat
    print(f"shared prompts vs plain forward: max abs diff {worst:.3g}")


def test_a_prompt_seen_first_is_bit_for_bit_the_plain_pass(tiny_teacher):
    on = load_engine(str(tiny_teacher), prompt_cache_mb=16)
    off = load_engine(str(tiny_teacher), prompt_cache_mb=0)
    assert off.prompts is None
    reqs = ragged_requests(on.info.vocab_size, n=8, seed=5, top_k=4)
    for a, b in zip(on.score(reqs), off.score(reqs), strict=True):
        np.testing.assert_array_equal(a.token_logprobs, b.token_logprobs)
        np.testing.assert_array_equal(a.top_k_logprobs, b.top_k_logprobs)
    # Reused, the same requests agree to float32 rounding (checked against a plain forward above).
    again = on.score(reqs)
    assert on.last_reused == [r.prompt_token_ids.size for r in reqs]
    for a, b in zip(again, off.score(reqs), strict=True):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5, rtol=0)


def test_a_packed_pass_reports_a_model_that_does_not_hand_its_plan_to_attention(tiny_teacher):
    """Without the wrapped attention the plan reaches no layer: the pass says so (None) rather than return the
    hidden states of one causal sequence running across requests."""
    from services.teacher.engine import flat_reuse

    engine = load_engine(str(tiny_teacher), prompt_cache_mb=16)
    reqs = shared_prompt_requests(engine.info.vocab_size, seed=4)
    engine.score(reqs)
    states = [engine.prompts.get(prompt_key(r.prompt_token_ids)).kv_L2hPd for r in reqs[6:9]]
    with torch.inference_mode():
        assert flat_reuse.flat_pass(engine.decoder, engine.device, reqs[6:9], states) is not None
        engine.model.set_attn_implementation("sdpa")  # the model's own attention: the plan is dropped
        assert flat_reuse.flat_pass(engine.decoder, engine.device, reqs[6:9], states) is None


def state(n_bytes_each: int) -> PromptState:
    # keys and values of one layer, n_bytes_each bytes each
    return PromptState(kv_L2hPd=torch.zeros((1, 2, 1, n_bytes_each // 4, 1)), last_H=torch.zeros(0))


def test_lru_keeps_to_its_bound_and_evicts_the_least_recent():
    lru = PromptLRU(max_bytes=3900)
    keys = [prompt_key(np.arange(n)) for n in range(1, 5)]
    assert len(set(keys)) == 4 and prompt_key(np.arange(3)) == prompt_key(np.arange(3, dtype=np.int32))
    for k in keys[:2]:
        lru.put(k, state(400))  # 800 bytes each (keys + values)
    assert lru.get(keys[0]) is not None  # keys[1] is now the least recent
    for k in keys[2:]:
        lru.put(k, state(600))  # 1200 each: 800 + 800 + 1200 + 1200 > 3900 evicts keys[1]
    assert lru.bytes <= lru.max_bytes and lru.evictions == 1
    assert lru.get(keys[1]) is None and lru.get(keys[0]) is not None
    lru.put(prompt_key(np.arange(9)), state(4000))  # larger than the whole bound: not kept
    assert len(lru) == 3 and (lru.hits, lru.misses) == (2, 1)


def test_only_full_attention_models_reuse_prompts():
    from transformers import LlamaConfig, MistralConfig

    assert supports_reuse(LlamaConfig())
    assert not supports_reuse(MistralConfig(sliding_window=64))


def test_float32_head_over_a_bfloat16_trunk(tiny_teacher, reference_model):
    engine = load_engine(str(tiny_teacher), dtype="bfloat16", lm_head_dtype="float32", cpu_linear="torch")
    assert engine.lm_head.weight.dtype == torch.float32
    # the tied embedding is not touched
    assert engine.model.get_input_embeddings().weight.dtype == torch.bfloat16
    reqs = ragged_requests(engine.info.vocab_size, n=4, seed=7)
    for req, res in zip(reqs, engine.score(reqs), strict=True):
        # bfloat16 trunk: loose, but a real check
        assert_matches_reference(reference_model, req, res, tol=0.5)
    with pytest.raises(ValueError, match="lm_head_dtype"):
        load_engine(str(tiny_teacher), lm_head_dtype="float64")


def test_length_groups_cover_every_item_once_and_pad_less():
    from services.teacher.engine.prompt_kv import length_groups

    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(15, 64, 56)]
    items = list(range(100, 156))
    groups = length_groups(items, lengths)
    assert sorted(i for g in groups for i in g) == items and 1 < len(groups) <= 4
    padded = sum(len(g) * max(lengths[i - 100] for i in g) for g in groups)
    assert padded < len(items) * max(lengths)
    assert length_groups([7, 8], [5, 5]) == [[7, 8]]  # equal lengths: one pass
    assert length_groups([], []) == []


def tiny_model(kind: str, out) -> str:
    """A random 2-layer Qwen3 or Mistral (no sliding window) with the tests' tokenizer: other model code than
    Llama's, whose attention must receive the packed pass's plan too."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from services.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(512)
    config_cls, model_cls, extra = {
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
        "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    }[kind]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **extra,
    )
    torch.manual_seed(0)
    model = model_cls(config)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("kind", ["qwen3", "mistral"])
def test_packed_reuse_on_other_architectures_matches_a_plain_forward(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_model(kind, tmp_path / kind)
    engine = load_engine(path, prompt_cache_mb=16)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reqs = shared_prompt_requests(engine.info.vocab_size, seed=7, top_k=5)
    engine.score(reqs)
    results = engine.score(reqs)  # every prompt kept: all reused, in one packed pass
    assert engine.flat_reuse and engine.last_reused == [r.prompt_token_ids.size for r in reqs]
    for req, res in zip(reqs, results, strict=True):
        assert_matches_reference(reference, req, res, TOL_F32)
