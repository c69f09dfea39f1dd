"""Shared prompts: a prompt's keys and values are computed once and reused by every request that shares it.

Distillation traffic scores the same prompt again and again (`samples_per_prompt` samples of it, every epoch,
every job on the same prompt set), and the prompt is usually longer than the scored prefix. So:

- within a batch, the first request with a given prompt runs the plain padded pass (`padded_pass`), which keeps
  that prompt's per-layer keys/values and the hidden state of its last token (which predicts completion token 0);
- every other request with that prompt, in this batch or a later one (a bounded LRU, `PromptLRU`), runs only
  its completion tokens, attending to the kept keys/values (`completion_pass`).

Exactness: a request that computes its prompt gets exactly what the plain pass always gave (the same call, bit
for bit). A request that reuses a prompt gets the same math with another summation order (measured in
float32: differences of order 1e-6 nats on short sequences, tests/test_prompt_kv.py and
docs/results/teacher_throughput.md; up to 8.5e-5 on the route teacher's 214-position answers, growing with the
position: tests/tolerance.py).
Keys are per engine, i.e. per model and dtype, and hold the prompt ids themselves (a digest of them).

Only models whose layers all use full causal attention qualify (`supports_reuse`): a sliding-window layer's
cache is not a plain prefix of keys/values.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.teacher.batch_cost import prompt_key
from services.teacher.engine import flat_reuse
from services.teacher.types import ScoreRequest


@dataclass(frozen=True)
class PromptState:
    """What a request needs of its prompt to run only its completion tokens."""

    kv_L2hPd: torch.Tensor
    """Keys and values of every layer in one tensor (layers, 2, kv heads, P, head_dim), rotary positions 0..P-1
    applied: a request is assembled with one copy, not two per layer (thousands of small kernels on a GPU)."""
    last_H: torch.Tensor
    """(H,) final hidden state at the last prompt token: it predicts completion token 0."""

    @property
    def nbytes(self) -> int:
        return self.kv_L2hPd.nbytes + self.last_H.nbytes


class PromptLRU:
    """Prompt states, least recently used evicted first, bounded by their bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._items: OrderedDict[bytes, PromptState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> PromptState | None:
        state = self._items.get(key)
        if state is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return state

    def put(self, key: bytes, state: PromptState) -> None:
        if key in self._items or state.nbytes > self.max_bytes:
            return
        self._items[key] = state
        self.bytes += state.nbytes
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1


def supports_reuse(config) -> bool:
    """Whether every attention layer of this model is full causal attention (no sliding window, no recurrence)."""
    text = config.get_text_config(decoder=True)
    layer_types = getattr(text, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in layer_types) and not getattr(text, "sliding_window", None)


def padded_pass(decoder, device: torch.device, requests: Sequence[ScoreRequest], keep_cache: bool):
    """One right-padded (B, S) pass over prompt + completion of each request, with an attention mask and explicit
    position ids so each row computes exactly what it would alone. Returns the final hidden states (B, S, H) and,
    with `keep_cache`, the model's key/value cache of the pass (else None)."""
    B = len(requests)
    lengths = [r.num_tokens for r in requests]
    S = max(lengths)
    ids_BS = np.zeros((B, S), dtype=np.int64)
    mask_BS = np.zeros((B, S), dtype=np.int64)
    for i, r in enumerate(requests):
        p, n = r.prompt_token_ids.size, lengths[i]
        ids_BS[i, :p] = r.prompt_token_ids
        ids_BS[i, p:n] = r.completion_token_ids
        mask_BS[i, :n] = 1
    out = decoder(
        input_ids=torch.from_numpy(ids_BS).to(device),
        attention_mask=torch.from_numpy(mask_BS).to(device),
        position_ids=torch.arange(S, device=device).unsqueeze(0).expand(B, S),
        use_cache=keep_cache,
    )
    return out.last_hidden_state, (_returned_cache(out) if keep_cache else None)


def _cache_kwarg(decoder) -> str:
    """The decoder's name for a key/value cache argument: `cache` (transformers >= 5.2x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def prompt_states(cache, hidden_BSH: torch.Tensor, requests: Sequence[ScoreRequest]) -> list[PromptState]:
    """The prompt state of each request of a `padded_pass` (copies: the pass's big tensors can be freed)."""
    kv_L2BhSd = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
    states = []
    for b, r in enumerate(requests):
        P = r.prompt_token_ids.size
        states.append(PromptState(kv_L2BhSd[:, :, b, :, :P].clone(), hidden_BSH[b, P - 1].clone()))
    return states


def completion_pass(decoder, device, requests: Sequence[ScoreRequest], states: Sequence[PromptState]):
    """Final hidden states (R, Tc, H) of completion tokens 0..T-2 of each request (the last completion token
    predicts nothing that is scored), attending to its prompt's kept keys/values. Rows are right-padded to
    Tc = max(T) - 1 and prompts to Pm = max(P); masked columns hide the padding."""
    from transformers import DynamicCache

    R = len(requests)
    P = [r.prompt_token_ids.size for r in requests]
    Pm, Tc = max(P), max(r.completion_token_ids.size for r in requests) - 1
    ids_RT = np.zeros((R, Tc), dtype=np.int64)
    mask_RK = np.zeros((R, Pm + Tc), dtype=np.int64)  # K = Pm + Tc: kept prompt columns, then new ones
    pos_RT = np.zeros((R, Tc), dtype=np.int64)
    for i, r in enumerate(requests):
        t = r.completion_token_ids.size - 1
        ids_RT[i, :t] = r.completion_token_ids[:t]
        mask_RK[i, : P[i]] = 1
        mask_RK[i, Pm : Pm + t] = 1
        pos_RT[i] = P[i] + np.arange(Tc)
    if all(p == Pm for p in P):  # one kernel
        kv_RL2hPd = torch.stack([s.kv_L2hPd for s in states])
    else:  # one copy per row; the padding columns are masked
        L, _, h, _, d = states[0].kv_L2hPd.shape
        kv_RL2hPd = states[0].kv_L2hPd.new_zeros((R, L, 2, h, Pm, d))
        for i, s in enumerate(states):
            kv_RL2hPd[i, :, :, :, : P[i]] = s.kv_L2hPd
    # strided (R, h, Pm, d) views per layer: the cache concatenates the new keys onto them (a copy it makes anyway)
    layers = [(kv_RL2hPd[:, layer, 0], kv_RL2hPd[:, layer, 1]) for layer in range(kv_RL2hPd.shape[1])]
    out = decoder(
        input_ids=torch.from_numpy(ids_RT).to(device),
        attention_mask=torch.from_numpy(mask_RK).to(device),
        position_ids=torch.from_numpy(pos_RT).to(device),
        use_cache=True,
        **{_cache_kwarg(decoder): DynamicCache(ddp_cache_data=layers)},
    )
    return out.last_hidden_state


def scored_rows(hidden_BSH: torch.Tensor, requests: Sequence[ScoreRequest]) -> torch.Tensor:
    """Hidden states (N, H) that predict the completion tokens of a `padded_pass`: token t of row i is predicted
    at P_i + t - 1."""
    dev = hidden_BSH.device
    rows = np.repeat(np.arange(len(requests)), [r.completion_token_ids.size for r in requests])
    cols = np.concatenate([np.arange(r.prompt_token_ids.size - 1, r.num_tokens - 1) for r in requests])
    return hidden_BSH[torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev)]


@dataclass
class ReusePlan:
    """Which requests of a batch compute their prompt (`fresh`) and which reuse a kept one (`reuse`)."""

    keys: list[bytes]
    fresh: list[int]
    """Indices of the first request of each prompt that is not kept yet: they run the plain pass."""
    reuse: list[int]
    """Indices of the others."""
    kept: dict[bytes, PromptState]
    """The states found in the LRU (held here: the batch's own puts may evict them)."""


def sequence_key(r: ScoreRequest) -> bytes:
    """The prompt key of a request's whole sequence (prompt + completion): what `keep_sequence` keeps it under."""
    return prompt_key(np.concatenate([r.prompt_token_ids, r.completion_token_ids]), r.cache_scope)


def plan(requests: Sequence[ScoreRequest], lru: PromptLRU) -> ReusePlan:
    """Requests with `keep_sequence` always run the plain pass (their whole sequence's keys/values are kept), and
    a request whose prompt is such a sequence of this batch reuses it, as it would a prompt of the batch."""
    keys = [prompt_key(r.prompt_token_ids, r.cache_scope) for r in requests]
    kept_here = {sequence_key(r) for r in requests if r.keep_sequence}
    fresh, reuse, kept, seen = [], [], {}, set()
    for i, key in enumerate(keys):
        if requests[i].keep_sequence:
            fresh.append(i)
            continue
        if key not in seen and key not in kept_here and (state := lru.get(key)) is not None:
            kept[key] = state
        (reuse if key in seen or key in kept or key in kept_here else fresh).append(i)
        seen.add(key)
    return ReusePlan(keys, fresh, reuse, kept)


def sequence_state(cache, hidden_BSH: torch.Tensor, b: int, n: int) -> PromptState:
    """The state of the first `n` tokens of row `b` of a `padded_pass` (a copy), as if they were a prompt."""
    kv_L2hnd = torch.stack(
        [torch.stack([layer.keys[b, :, :n], layer.values[b, :, :n]]) for layer in cache.layers]
    )
    return PromptState(kv_L2hnd.clone(), hidden_BSH[b, n - 1].clone())


def length_groups(items: Sequence[int], lengths: Sequence[int], max_groups: int = 4) -> list[list[int]]:
    """`items` split into at most `max_groups` passes of similar length (longest first), choosing the split that
    pads least: each pass costs its rows x its longest length, plus one mean row's worth per extra pass."""
    if not items:
        return []
    order = sorted(range(len(items)), key=lambda j: -lengths[j])
    best: tuple[float, list[list[int]]] | None = None
    for k in range(1, min(max_groups, len(items)) + 1):
        size = -(-len(items) // k)
        groups = [order[g : g + size] for g in range(0, len(order), size)]
        cost = sum(len(g) * lengths[g[0]] for g in groups) + (len(groups) - 1) * sum(lengths) / len(items)
        if best is None or cost < best[0]:
            best = (cost, groups)
    assert best is not None
    return [[items[j] for j in g] for g in best[1]]


def reused_rows(
    decoder, device, requests: Sequence[ScoreRequest], states: dict[int, PromptState], flat: bool
):
    """Hidden states (T_i - 1, H) of completion tokens 0..T_i - 2 of each request i in `states` (its prompt's
    kept state), by index: one packed pass with `flat` (engine/flat_reuse.py), else (or where the model turns out
    not to take it) padded passes of similar lengths. Also returns whether packed passes work for this model."""
    if flat:
        hidden_NH = flat_reuse.flat_pass(
            decoder, device, [requests[i] for i in states], [s.kv_L2hPd for s in states.values()]
        )
        if hidden_NH is not None:
            sizes = [requests[i].completion_token_ids.size - 1 for i in states]
            return dict(zip(states, torch.split(hidden_NH, sizes), strict=True)), True
    rows = {}
    index = list(states)
    for group in length_groups(index, [requests[i].completion_token_ids.size - 1 for i in index]):
        hidden_RTH = completion_pass(
            decoder, device, [requests[i] for i in group], [states[i] for i in group]
        )
        for row, i in enumerate(group):
            rows[i] = hidden_RTH[row, : requests[i].completion_token_ids.size - 1]
    return rows, False


def scored_hidden_with_reuse(
    decoder, device, requests: Sequence[ScoreRequest], lru: PromptLRU, flat: bool = False
):
    """Hidden states (N, H) predicting every completion token of `requests`, in request order (the same rows as
    `scored_rows(padded_pass(...))`), computing each distinct prompt at most once. Also returns, per request, the
    number of prompt tokens it reused rather than computed, and whether `flat` passes work for this model:
    with `flat`, the requests that reuse a prompt run in one packed pass (engine/flat_reuse.py), else in padded
    passes of similar lengths."""
    p = plan(requests, lru)
    per_request: list[torch.Tensor | None] = [None] * len(requests)
    batch_states = dict(p.kept)
    if p.fresh:
        fresh = [requests[i] for i in p.fresh]
        hidden_BSH, cache = padded_pass(decoder, device, fresh, keep_cache=True)
        for j, (i, state) in enumerate(zip(p.fresh, prompt_states(cache, hidden_BSH, fresh), strict=True)):
            r = requests[i]
            per_request[i] = hidden_BSH[j, r.prompt_token_ids.size - 1 : r.num_tokens - 1]
            batch_states.setdefault(p.keys[i], state)
            lru.put(p.keys[i], state)
            if r.keep_sequence:
                whole = sequence_state(cache, hidden_BSH, j, r.num_tokens)
                batch_states[sequence_key(r)] = whole
                lru.put(sequence_key(r), whole)
        del cache
    states = {i: batch_states[p.keys[i]] for i in p.reuse}
    longer = {i: s for i, s in states.items() if requests[i].completion_token_ids.size > 1}
    rows, flat = reused_rows(decoder, device, requests, longer, flat) if longer else ({}, flat)
    for i in p.reuse:  # the prompt's last hidden state predicts completion token 0
        per_request[i] = torch.cat([states[i].last_H[None], rows[i]]) if i in rows else states[i].last_H[None]
    reused = [0] * len(requests)
    for i in p.reuse:
        reused[i] = requests[i].prompt_token_ids.size
    return torch.cat(per_request), reused, flat  # type: ignore[arg-type]
