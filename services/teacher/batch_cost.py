"""What a batch costs against the teacher's token budget (`max_batch_tokens`): the one rule behind the queue's
claim (mirrored in Lua by `queue_scripts._CLAIM`) and the engine's split of what it is handed (`Engine.score`).

A batch runs as one right-padded pass: B requests x the longest prompt + completion. With prompt reuse
(engine/prompt_kv.py), only the first request of each prompt runs in that pass; every other request with the same
prompt runs just its completion tokens, packed, against the prompt's kept keys and values. So

    without reuse:  cost = B x longest
    with reuse:     cost = F x longest of those F + the other requests' completion tokens

where the F "fresh" requests are the first of each distinct prompt. A prompt the worker kept from an earlier batch
still counts as fresh (the budget does not know the worker's cache), so the cost is an upper bound on the tokens
a pass computes. A single request always fits, whatever its cost.
"""

from __future__ import annotations

import hashlib

import numpy as np


def prompt_key(prompt_ids: np.ndarray, scope: str = "") -> bytes:
    """A prompt's identity within a cache `scope` (a tenant; "" for the shared cache): a 128-bit digest of its
    token ids (length included), keyed by the scope, so that equal prompts of two tenants never share an entry.
    The prompt cache's key, and what the queue compares (as hex) to see that two requests share a prompt."""
    ids = np.ascontiguousarray(prompt_ids, dtype=np.int64)
    key = hashlib.blake2b(scope.encode(), digest_size=32).digest() if scope else b""
    return hashlib.blake2b(ids.tobytes(), digest_size=16, key=key, person=b"prompt-kv").digest()


class BatchCost:
    """The running cost of a batch being filled, request by request."""

    def __init__(self, reuse: bool) -> None:
        self.reuse = reuse
        self.n = 0
        """Requests in the batch."""
        self.fresh = 0
        """Requests in the padded pass (all of them without reuse)."""
        self.longest = 0
        """Longest prompt + completion among those."""
        self.packed = 0
        """Completion tokens of the requests that reuse a prompt of the batch."""
        self._prompts: set[bytes] = set()

    def shares_prompt(self, key: bytes | None) -> bool:
        return self.reuse and key is not None and key in self._prompts

    def cost_with(self, tokens: int, completion_tokens: int, key: bytes | None) -> int:
        """The batch's cost once a request of `tokens` (prompt + completion) is added; `key` its prompt's."""
        if self.shares_prompt(key):
            return self.fresh * self.longest + self.packed + completion_tokens
        return (self.fresh + 1) * max(self.longest, tokens) + self.packed

    def fits(self, budget: int, tokens: int, completion_tokens: int, key: bytes | None) -> bool:
        return self.n == 0 or self.cost_with(tokens, completion_tokens, key) <= budget

    def add(self, tokens: int, completion_tokens: int, key: bytes | None) -> None:
        if self.shares_prompt(key):
            self.packed += completion_tokens
        else:
            self.fresh += 1
            self.longest = max(self.longest, tokens)
            if key is not None:
                self._prompts.add(key)
        self.n += 1
