"""Batched generation with a KV cache: stops a row at its `max_tokens` or EOS; records ids and logprobs (and,
when asked, the sampling model's top-C ids at every position: a student's own candidates for the teacher).

In training `max_tokens` is the step's prefix length L (per row: the rollouts of the tail anchor run to the full
length), in evaluation the full answer length. The model is the student's, or the teacher's for off-policy
rollouts. Prompts are
left-padded into one (B, P) batch with explicit position ids, so every row computes what it would alone. Each
step feeds one token per row through the cache; rows that finished keep being fed the pad token (their outputs
are ignored) until every row is done or `max_tokens` tokens were generated. temperature = 0 is greedy.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Rollouts:
    """Generated completions of a batch of prompts, right-padded."""

    prompt_ids: list[list[int]]
    """Each row's prompt (unpadded)."""
    ids_BT: torch.Tensor
    """(B, T) int64 generated ids, padded with `pad_id` after each row's end (T = longest row)."""
    sample_lp_BT: torch.Tensor
    """(B, T) float32 log-probability of each sampled token under the sampling distribution (at temperature)."""
    mask_BT: torch.Tensor
    """(B, T) float32, 1 for generated tokens (EOS included), 0 for padding."""
    pad_id: int
    cand_ids_BTC: torch.Tensor | None = None
    """(B, T, C) int64 the sampling model's C most likely ids at each position (`generate(candidates=C)`)."""

    @property
    def lengths(self) -> list[int]:
        return [int(n) for n in self.mask_BT.sum(1).tolist()]

    def completion(self, i: int) -> list[int]:
        return self.ids_BT[i, : self.lengths[i]].tolist()

    def select(self, rows: Sequence[int]) -> Rollouts:
        """The rollouts of `rows` only, trimmed to their longest completion."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        T = max(1, int(self.mask_BT[idx].sum(1).max()))
        return Rollouts(
            [self.prompt_ids[i] for i in rows],
            self.ids_BT[idx, :T],
            self.sample_lp_BT[idx, :T],
            self.mask_BT[idx, :T],
            self.pad_id,
            None if self.cand_ids_BTC is None else self.cand_ids_BTC[idx, :T],
        )


def from_completions(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> Rollouts:
    """Rollouts holding given completions (e.g. gold answers), right-padded; no sampling log-probabilities (0)."""
    assert len(prompts) == len(completions) and all(len(c) > 0 for c in completions)
    T = max(len(c) for c in completions)
    ids = torch.full((len(completions), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), T), dtype=torch.float32)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        mask[i, : len(c)] = 1.0
    return Rollouts([list(p) for p in prompts], ids, torch.zeros_like(mask), mask, pad_id)


def _cache_kwarg(model) -> str:
    """transformers 5 names the KV cache argument `cache`; 4.x named it `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's LoRA wrapper
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast of the student's forward passes to `dtype` (None: float32, no autocast)."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def pad_id_of(tokenizer) -> int:
    """The id that pads rollouts: the tokenizer's pad token, else its EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P), attention mask (B, P)) with prompts right-aligned."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, P - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_tokens: int | Sequence[int],
    *,
    eos_id: int | None,
    pad_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    candidates: int = 0,
    forced: Sequence[dict[int, int]] | None = None,
    banned: Sequence[int] = (),
) -> Rollouts:
    """Samples up to `max_tokens` tokens per prompt (stopping a row at `eos_id`); temperature 0 = greedy.
    With `candidates` = C > 0 it also records the model's top-C ids at every position (`cand_ids_BTC`).
    `forced[i]` = {offset t: id} writes those ids at row i's completion offsets instead of drawing (their
    recorded log-probability is the model's own for that id); `banned` ids are never drawn (their logits are
    -inf before the softmax). Both serve the shortcut baselines and the execution metric.

    `max_tokens` is how far this call runs, one number for every row or one per row: the step's prefix length L
    in training (L <= the config's `max_new_tokens`, the full response length), `eval.max_new_tokens` in
    evaluation. Draws come from `generator` (on the CPU), so a seeded generator reproduces the same rollouts.
    """
    assert len(prompts) > 0 and all(len(p) > 0 for p in prompts), "prompts must be non-empty"
    B = len(prompts)
    limits = [max_tokens] * B if isinstance(max_tokens, int) else list(max_tokens)
    assert len(limits) == B and min(limits) >= 1, f"bad max_tokens {max_tokens}"
    limit_B = torch.as_tensor(limits, dtype=torch.long)
    max_tokens = max(limits)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, attn = left_pad(prompts, pad_id, device)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    cache_kw = _cache_kwarg(model)
    out_ids = torch.full((B, max_tokens), pad_id, dtype=torch.long)
    out_lp = torch.zeros((B, max_tokens), dtype=torch.float32)
    out_mask = torch.zeros((B, max_tokens), dtype=torch.float32)
    out_cand = torch.zeros((B, max_tokens, candidates), dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    cache = None
    feed, feed_pos = ids, pos
    T = 0
    autocast = _autocast(device, autocast_dtype)
    for t in range(max_tokens):
        with autocast:
            out = model(
                input_ids=feed,
                attention_mask=attn,
                position_ids=feed_pos,
                use_cache=True,
                logits_to_keep=1,
                **{cache_kw: cache},
            )
        cache = _output_cache(out)
        logits_BV = out.logits[:, -1].float().cpu()
        if banned:
            logits_BV[:, list(banned)] = float("-inf")
        if temperature > 0:
            lp_BV = torch.log_softmax(logits_BV / temperature, dim=-1)
            tok_B = torch.multinomial(lp_BV.exp(), 1, generator=generator).squeeze(1)
        else:
            lp_BV = torch.log_softmax(logits_BV, dim=-1)
            tok_B = lp_BV.argmax(-1)
        if forced is not None:
            tok_B = _force(tok_B, forced, t)
        live = ~done
        out_ids[live, t] = tok_B[live]
        out_lp[live, t] = lp_BV.gather(1, tok_B[:, None]).squeeze(1)[live]
        out_mask[live, t] = 1.0
        if candidates:
            out_cand[live, t] = lp_BV.topk(candidates, dim=-1).indices[live]  # (B, C)
        T = t + 1
        done |= live & (limit_B <= T)
        if eos_id is not None:
            done |= live & (tok_B == eos_id)
        if bool(done.all()) or t == max_tokens - 1:
            break
        feed = torch.where(done, torch.full_like(tok_B, pad_id), tok_B)[:, None].to(device)
        feed_pos = feed_pos[:, -1:] + 1
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
    model.train(was_training)
    cand = out_cand[:, :T] if candidates else None
    return Rollouts([list(p) for p in prompts], out_ids[:, :T], out_lp[:, :T], out_mask[:, :T], pad_id, cand)


def _force(tok_B: torch.Tensor, forced: Sequence[dict[int, int]], t: int) -> torch.Tensor:
    """The draws (B,) with row i's id replaced by forced[i][t] where it names one."""
    out = tok_B.clone()
    for i, row in enumerate(forced):
        if t in row:
            out[i] = row[t]
    return out


def student_logprobs(model, rollouts: Rollouts, *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The student's log-probabilities (B, T, V) at every completion position, with gradient (temperature 1).

    Layout: [left-padded prompt | right-padded completion]; all prompts end at the same column, so the logits of
    completion position t of every row sit at column P - 1 + t, and `logits_to_keep=T + 1` computes the LM head
    only for those (plus the last column, dropped).
    """
    device = next(model.parameters()).device
    ids_P, attn_P = left_pad(rollouts.prompt_ids, rollouts.pad_id, device)
    comp = rollouts.ids_BT.to(device)
    comp_mask = rollouts.mask_BT.to(device).long()
    ids = torch.cat([ids_P, comp], dim=1)
    attn = torch.cat([attn_P, comp_mask], dim=1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    T = comp.shape[1]
    autocast = _autocast(device, autocast_dtype)
    with autocast:
        out = model(
            input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=T + 1
        )
    logits_BTV = out.logits[:, :-1].float()
    return torch.log_softmax(logits_BTV, dim=-1)
