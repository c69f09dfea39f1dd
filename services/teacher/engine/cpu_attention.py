"""Causal attention in query blocks on CPU GEMMs, as a transformers attention implementation (`cpu_blocked`).

On 2 AMD EPYC cores with AVX512-BF16, torch's CPU flash-attention kernel (what `sdpa` runs) took ~15 ms per
SmolLM2 layer on 16 x 256 tokens, in bfloat16 no faster than in float32: about a quarter of the bfloat16 engine's
time. The same attention as batched matrix products ran in ~6 ms (bfloat16, oneDNN's GEMMs) and ~11 ms (float32):
the queries are cut into blocks of `BLOCK_ROWS` rows; each block attends only to the keys up to its last row
(causality skips the rest); the query heads that share a key/value head are stacked into one GEMM; the softmax
runs in float32. The SmolLM2 engine ran 1.15x faster in bfloat16, 1.035x in float32
(docs/results/teacher_throughput.md). `choose` probes both on the model's head layout once per process.

The query-key products come out of the GEMM in the weights' dtype, the scaling, mask and softmax run in float32,
and the probabilities are rounded to the value dtype for the second product. In bfloat16 the flash kernel keeps
the products in float32: doing so here too (float32 GEMMs for them) ran at 1.11x the sdpa engine instead of
1.17x, with the same error against a float32 forward within noise (token logprobs, mean abs 0.0347 vs 0.0360
nats on 16 x 256 tokens; sdpa 0.0358), so the products stay in bfloat16.

Masks: transformers hands over `None` (plain causal) or a boolean (B, 1, Q, K) mask, True where a query may
attend (its `sdpa_mask`, registered for this implementation too). A row whose every key is masked comes out as zeros
rather than NaN (a NaN value row would poison every query that multiplies it by a zero probability).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from services.teacher.engine import cpu_linear

NAME = "cpu_blocked"
CHOICES = ("auto", "sdpa", "blocked")
# Query rows per block: the SmolLM2 engine ran alike with 16, 32 and 64 (16 x 256 tokens, both dtypes; 64 ~2%
# slower in float32); the attention alone slowed down markedly at 128 (the float32 score block leaves the cache).
BLOCK_ROWS = 32
# `auto` takes blocked attention where the probe finds it at least this much faster than sdpa.
MIN_SPEEDUP = 1.1


def attention(
    query_BhQd: torch.Tensor,
    key_BkKd: torch.Tensor,
    value_BkKd: torch.Tensor,
    mask_B1QK: torch.Tensor | None,
    scaling: float,
    causal: bool = True,
) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v, per head, returned as (B, Q, h, d) (the layout the output projection
    reads). `query` has h heads, `key`/`value` k heads (h a multiple of k: grouped-query attention). With
    `causal`, the Q queries are the last Q of the K positions (K - Q of them cached before) and query i sees
    keys 0..K - Q + i: the keys past that are never computed, and a mask must hide them too. With no mask,
    causality is applied here (keys beyond Q dropped, as transformers' sdpa path does for an empty static
    cache); a mask, boolean (True = attend) or additive, is applied as given."""
    B, h, Q, d = query_BhQd.shape
    k = key_BkKd.shape[1]
    G = h // k
    if mask_B1QK is None and causal:
        key_BkKd, value_BkKd = key_BkKd[:, :, :Q], value_BkKd[:, :, :Q]
    K = key_BkKd.shape[2]
    dt = value_BkKd.dtype
    Z = B * k  # one GEMM per (sequence, key/value head): 3-d bmm takes strided slices without copying them
    q_BkGQd = query_BhQd.view(B, k, G, Q, d)
    k_ZKd, v_ZKd = key_BkKd.reshape(Z, K, d), value_BkKd.reshape(Z, K, d)
    out_BQkGd = torch.empty((B, Q, k, G, d), dtype=dt, device=query_BhQd.device)
    for i in range(0, Q, BLOCK_ROWS):
        e = min(Q, i + BLOCK_ROWS)
        n = e - i
        kend = K - Q + e if causal else K
        q_ZMd = q_BkGQd[:, :, :, i:e].reshape(Z, G * n, d)  # M = G * n rows
        s_ZMK = torch.bmm(q_ZMd, k_ZKd[:, :kend].transpose(1, 2)).float()
        s_ZMK.mul_(scaling)
        s_BkGnK = s_ZMK.view(B, k, G, n, kend)
        if mask_B1QK is not None:
            m_B11nK = mask_B1QK[:, :, i:e, :kend].unsqueeze(2)
            if m_B11nK.dtype == torch.bool:
                s_BkGnK.masked_fill_(~m_B11nK, float("-inf"))
            else:
                s_BkGnK.add_(m_B11nK)
        elif causal:  # the block's diagonal square: key j > query row r is hidden
            upper_nn = torch.ones((n, n), dtype=torch.bool, device=s_ZMK.device).triu_(1)
            s_BkGnK[..., kend - n :].masked_fill_(upper_nn, float("-inf"))
        p_ZMK = torch.softmax(s_ZMK, dim=-1)
        if mask_B1QK is not None:  # a row with every key masked: zeros, not NaN (0 x NaN would spread it)
            p_ZMK.nan_to_num_(0.0)
        o_ZMd = torch.bmm(p_ZMK.to(dt), v_ZKd[:, :kend])
        out_BQkGd[:, i:e] = o_ZMd.view(B, k, G, n, d).permute(0, 3, 1, 2, 4)
    return out_BQkGd.view(B, Q, h, d)


def probe_kernels(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, tokens: int = 256):
    """The two sides `blocked_probe` times, as (sdpa, blocked) callables over 4 random causal sequences of
    `tokens` with this head layout in `dtype`. Call under `torch.inference_mode()`."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, heads, tokens, head_dim, generator=g).to(dtype)  # (B, h, Q, d)
    k, v = (
        torch.randn(4, kv_heads, tokens, head_dim, generator=g).to(dtype) for _ in range(2)
    )  # (B, k, K, d)
    gqa = heads != kv_heads

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    return sdpa, (lambda: attention(q, k, v, None, head_dim**-0.5))


@functools.cache
@torch.inference_mode()
def blocked_probe(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, tokens: int = 256
) -> cpu_linear.Verdict:
    """Whether `attention` runs at least MIN_SPEEDUP faster than torch's sdpa on this CPU for 4 causal sequences
    of `tokens` with this head layout (cpu_linear.probe of `probe_kernels`: repeated, interleaved trials).
    Measured once per process and shape, so every engine of a process chooses alike."""
    return cpu_linear.probe(*probe_kernels(dtype, heads, kv_heads, head_dim, tokens), MIN_SPEEDUP)


def choose(setting: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int):
    """`sdpa` or `blocked` for an engine: `choose_why`'s choice."""
    return choose_why(setting, device, dtype, heads, kv_heads, head_dim)[0]


def choose_why(
    setting: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> tuple[str, str]:
    """`sdpa` or `blocked` for an engine, and why (for the start-up log). `auto` on a CPU: blocked where a probe
    of the model's head layout finds it MIN_SPEEDUP faster than sdpa in the median trial, the margin slower in none (on AVX512-BF16 EPYC
    cores: ~2x in bfloat16, ~1.2-1.4x in float32, i.e. 1.15x and 1.035x the SmolLM2 engine); sdpa, the default,
    where it does not or the trials disagree. A GPU keeps sdpa (flash kernels)."""
    if setting not in CHOICES:
        raise ValueError(f"`cpu_attention` must be one of {list(CHOICES)}, got {setting!r}.")
    if device.type != "cpu":
        return "sdpa", f"on {device.type}"
    if setting != "auto":
        return setting, "asked for"
    verdict = blocked_probe(dtype, heads, kv_heads, head_dim)
    return ("blocked" if verdict.faster else "sdpa"), f"probe: {verdict.why}"


def apply(setting: str, model, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """Sets `model`'s attention as `choose_why` says, where the model can take it: a model with attention-logit
    softcapping, or one whose code predates transformers' attention interface, keeps sdpa. Returns the attention
    in use and why."""
    cfg = model.config.get_text_config()
    if getattr(cfg, "attn_logit_softcapping", None):
        return "sdpa", "attention-logit softcapping"
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    choice, why = choose_why(setting, device, dtype, heads, kv_heads, head_dim)
    if choice == "sdpa":
        return "sdpa", why
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError):
        return "sdpa", "the model takes no attention implementation of ours"
    return "blocked", why


def _forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """The transformers attention-interface signature (see transformers.integrations.sdpa_attention)."""
    if dropout:
        raise ValueError(f"{NAME} attention is for inference: dropout must be 0, got {dropout}.")
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError(f"{NAME} attention supports neither softcap nor position_bias; use sdpa.")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return attention(query, key, value, attention_mask, scale, causal=causal), None


def register() -> None:
    """Makes `cpu_blocked` a transformers attention implementation (with sdpa's masks); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
