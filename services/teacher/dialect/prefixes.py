"""Shared token prefixes without a boundary: found by hashes of fixed-size token blocks, scored once.

Stock clients send whole sequences (prompt and completion) and no boundary; a TRL step sends many completions of
each prompt, which vLLM recomputes from scratch (it skips its prefix cache for prompt logprobs). Here:

- `BlockIndex` counts, for every block-aligned prefix of every sequence this front-end has seen (a chain hash of
  `BLOCK` tokens at a time, a bounded LRU), how many sequences had it. A sequence's shared prefix is its longest
  block-aligned prefix that at least one other sequence had, in the same call or an earlier one: the same rule
  inside a call and across calls (TRL's `chunk_size=1` sends one sequence per call, concurrently).
- `PrefixResults` holds, per shared prefix (and top-k, temperature), the one request that scores its positions
  and keeps its keys/values in the worker's prompt cache (`keep_sequence`); every continuation is then queued
  with that prefix as its prompt, and the worker reuses the kept keys/values (engine/prompt_kv.py). The top-k at
  prompt positions is the same for every sample, so it is computed once and copied into each choice.

Block alignment keeps the prefixes of one prompt's samples equal, whatever their first completion tokens share.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from services.teacher.types import ScoreResult

BLOCK = 16
"""Tokens per hashed block: a shared prefix is a multiple of this."""
MIN_SHARED = BLOCK
"""Shorter shared prefixes are not worth a request of their own."""


def block_hashes(ids: list[int]) -> list[bytes]:
    """Chain hashes of the block-aligned prefixes of `ids`: entry j identifies ids[: (j + 1) * BLOCK]."""
    out, h = [], b""
    for s in range(0, len(ids) - len(ids) % BLOCK, BLOCK):
        block = b"".join(int(i).to_bytes(4, "little") for i in ids[s : s + BLOCK])
        h = hashlib.blake2b(h + block, digest_size=16, person=b"pd-prefix").digest()
        out.append(h)
    return out


class BlockIndex:
    """How many sequences had each block-aligned prefix, least recently seen forgotten first."""

    def __init__(self, max_entries: int = 1 << 16) -> None:
        self.max_entries = max_entries
        self._counts: OrderedDict[bytes, int] = OrderedDict()

    def add(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self._counts[h] = self._counts.get(h, 0) + 1
            self._counts.move_to_end(h)
        while len(self._counts) > self.max_entries:
            self._counts.popitem(last=False)

    def shared_length(self, hashes: list[bytes], limit: int) -> int:
        """Tokens of the longest block-aligned prefix (at most `limit`) that another sequence also had."""
        best = 0
        for j, h in enumerate(hashes):
            if (j + 1) * BLOCK > limit or self._counts.get(h, 0) < 2:
                break
            best = (j + 1) * BLOCK
        return best if best >= MIN_SHARED else 0


class PrefixResults:
    """The scores of shared prefixes' positions, one request per (prefix, top-k, temperature), bounded LRU.

    `get` returns the future result of positions 1..m-1 of a prefix, starting its request on first use; a
    failed request is forgotten so that the next call tries again."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple, asyncio.Future] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple, start: Callable[[], Awaitable[ScoreResult]]) -> asyncio.Future:
        fut = self._items.get(key)
        if fut is not None and not (fut.done() and (fut.cancelled() or fut.exception() is not None)):
            self.hits += 1
            self._items.move_to_end(key)
            return fut
        self.misses += 1
        fut = asyncio.ensure_future(start())
        fut.add_done_callback(lambda f, k=key: self._forget_failed(k, f))
        self._items[key] = fut
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)
        return fut

    def _forget_failed(self, key: tuple, fut: asyncio.Future) -> None:
        if (fut.cancelled() or fut.exception() is not None) and self._items.get(key) is fut:
            del self._items[key]
