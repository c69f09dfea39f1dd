"""The one engine interface: a batch of validated requests in, one result per request out.

Backends implement `forward`; `score` adds per-request validation (a bad request fails alone, not its batch)
and splits work to the token budget. Engines never import grpc or redis.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from services.teacher.batch_cost import BatchCost, prompt_key
from services.teacher.errors import TeacherError
from services.teacher.types import ModelInfo, ScoreRequest, ScoreResult
from services.teacher.validation import validate_request


class Engine(ABC):
    """Scores (prompt, completion) pairs with a teacher model."""

    info: ModelInfo
    tokenizer: object
    reuses_prompts: bool = False
    """Whether requests sharing a prompt compute it once (engine/prompt_kv.py): batches are then budgeted by
    what they compute (batch_cost.py)."""

    @abstractmethod
    def forward(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Scores already-validated requests that fit one batch; results in request order."""

    def check(self, request: ScoreRequest) -> None:
        """Raises InvalidRequest for a request this backend cannot score beyond what `ModelInfo` says (e.g. a
        temperature it cannot apply); runs after `validate_request`. Accepts everything by default."""
        return None

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult | TeacherError]:
        """Validates each request and scores the valid ones in token-budget batches.

        Returns one entry per request, in order: its result, or the TeacherError that rejected it.
        """
        out: list[ScoreResult | TeacherError | None] = [None] * len(requests)
        valid: list[int] = []
        for i, req in enumerate(requests):
            try:
                validate_request(req, self.info)
                self.check(req)
                valid.append(i)
            except TeacherError as err:
                out[i] = err
        budget = self.info.max_batch_tokens
        for chunk in split_by_tokens([requests[i] for i in valid], budget, valid, self.reuses_prompts):
            results = self.forward([requests[i] for i in chunk])
            for i, res in zip(chunk, results, strict=True):
                out[i] = res
        return out  # type: ignore[return-value]

    def score_one(self, request: ScoreRequest) -> ScoreResult:
        """Scores one request; raises its TeacherError if it is invalid."""
        (res,) = self.score([request])
        if isinstance(res, TeacherError):
            raise res
        return res


def split_by_tokens(
    requests: Sequence[ScoreRequest], budget: int, index: Sequence[int], reuse: bool = False
) -> list[list[int]]:
    """Groups `index` (parallel to `requests`) into consecutive chunks whose cost fits `budget`: a padded batch
    costs len(chunk) x its longest sequence, less with `reuse` where requests share a prompt (batch_cost.py). A
    single request always forms a chunk of its own."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    cost = BatchCost(reuse)
    for req, i in zip(requests, index, strict=True):
        n, t = req.num_tokens, req.completion_token_ids.size
        key = prompt_key(req.prompt_token_ids, req.cache_scope) if reuse else None
        if not cost.fits(budget, n, t, key):
            chunks.append(cur)
            cur, cost = [], BatchCost(reuse)
        cur.append(i)
        cost.add(n, t, key)
    if cur:
        chunks.append(cur)
    return chunks
