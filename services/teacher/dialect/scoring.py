"""One call of the dialect as ScoreRequests on the ordinary queue, and their results gathered per prompt position.

A prompt of n tokens is scored at positions start..n-1 (position i scores token i given the tokens before it):

- with a shared prefix of m tokens (prefixes.py): the prefix's positions come from the one request that scores
  it (`s[:1]` + `s[1:m]`, kept in the worker's prompt cache), and the rest from a request with `s[:m]` as its
  prompt, whose keys/values the worker reuses;
- otherwise from one request with `s[:start]` as its prompt.

A generated token (`max_tokens` >= 1) is a placeholder after the last position that the worker replaces by a
token it draws there (`sample_last`), in the same request; each further token is one more such request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from services.teacher.dialect.prefixes import BlockIndex, PrefixResults, block_hashes
from services.teacher.dialect.request import CallPlan, PromptWork
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.types import ScoreRequest, ScoreResult

PLACEHOLDER = 0
"""The token id standing for a token the worker draws itself (never input to the model: it is last)."""


@dataclass
class Generated:
    """One generated token and the scores of its position."""

    token_id: int
    logprob: float
    rank: int
    top_ids: np.ndarray
    """(K,) int32 most likely ids there, most likely first."""
    top_lps: np.ndarray
    """(K,) float32."""


@dataclass
class PromptScores:
    """The scores of one prompt, indexed by position i (i scores ids[i]); positions not scored stay NaN / 0."""

    lp_N: np.ndarray
    """(n,) float32 logprob of each prompt token."""
    rank_N: np.ndarray
    """(n,) int64 1-based rank of each prompt token."""
    top_ids_NK: np.ndarray
    """(n, K) int32 top-k ids (K: the call's `row_k`)."""
    top_lp_NK: np.ndarray
    """(n, K) float32."""
    cand_lp_NC: np.ndarray | None = None
    """(n, C) float32 logprobs at the candidate ids (rows from `start`), None without candidates."""
    full_NV: np.ndarray | None = None
    """(n, V) float32 whole-vocabulary rows (`prompt_logprobs: -1`), None otherwise."""
    generated: list[Generated] = field(default_factory=list)
    finish_reason: str | None = None
    reused: int = 0
    """Prompt tokens whose keys/values the worker reused for this prompt's requests."""

    @classmethod
    def empty(cls, n: int, k: int) -> PromptScores:
        return cls(
            np.full(n, np.nan, np.float32),
            np.zeros(n, np.int64),
            np.zeros((n, k), np.int32),
            np.full((n, k), np.nan, np.float32),
        )

    def fill(self, res: ScoreResult, first: int, count: int, skip_before: int = 0) -> None:
        """Rows 0..count-1 of `res` are positions first..first+count-1; positions < skip_before are left out."""
        lo = max(first, skip_before)
        src = slice(lo - first, count)
        dst = slice(lo, first + count)
        self.lp_N[dst] = res.token_logprobs[src]
        self.rank_N[dst] = res.token_ranks[src]
        if res.top_k_ids is not None:
            self.top_ids_NK[dst] = res.top_k_ids[src]
            self.top_lp_NK[dst] = res.top_k_logprobs[src]
        if res.full_logprobs is not None:
            if self.full_NV is None:
                self.full_NV = np.full((len(self.lp_N), res.full_logprobs.shape[1]), np.nan, np.float32)
            self.full_NV[dst] = res.full_float32()[src]
        if res.candidate_logprobs is not None:
            if self.cand_lp_NC is None:
                self.cand_lp_NC = np.full(
                    (len(self.lp_N), res.candidate_logprobs.shape[1]), np.nan, np.float32
                )
            self.cand_lp_NC[dst] = res.candidate_logprobs[src]
        self.reused += res.prompt_tokens_reused


def generated_of(res: ScoreResult) -> Generated:
    """The token a `sample_last` request drew, with the scores of its (last) row."""
    k = 0 if res.top_k_ids is None else res.top_k_ids.shape[1]
    return Generated(
        int(res.sampled_token_id),
        float(res.token_logprobs[-1]),
        int(res.token_ranks[-1]),
        res.top_k_ids[-1] if k else np.zeros(0, np.int32),
        res.top_k_logprobs[-1] if k else np.zeros(0, np.float32),
    )


class CallScorer:
    """Scores the prompts of calls through a Dispatcher; one per front-end (it holds the prefix memory)."""

    def __init__(self, dispatcher, eos_token_id: int) -> None:
        self.dispatcher = dispatcher
        self.eos_token_id = eos_token_id
        self.index = BlockIndex()
        self.prefixes = PrefixResults()

    async def _submit(self, req: ScoreRequest, principal) -> ScoreResult:
        raw, _ = await self.dispatcher.submit(req, "vllm", principal=principal)
        return ScoreResult.from_pb(pb.ScoreResponse.FromString(raw))

    def shared_lengths(self, plan: CallPlan) -> list[int]:
        """Each prompt's shared block-aligned prefix (0: none), this call's sequences counted first."""
        hashes = [block_hashes(p.ids) for p in plan.prompts]
        for h in hashes:
            self.index.add(h)
        return [
            self.index.shared_length(h, len(p.ids) - 1) for h, p in zip(hashes, plan.prompts, strict=True)
        ]

    async def score_call(self, plan: CallPlan, job_id: str, principal) -> list[PromptScores]:
        shared = self.shared_lengths(plan) if plan.scores_prompt else [0] * len(plan.prompts)
        return list(
            await asyncio.gather(
                *(
                    self.score_prompt(plan, p, m, job_id, principal)
                    for p, m in zip(plan.prompts, shared, strict=True)
                )
            )
        )

    def _base(self, plan: CallPlan, job_id: str) -> dict:
        return dict(
            job_id=job_id,
            request_id="vllm",
            top_k=plan.row_k,
            temperature=plan.temperature,
            token_ranks=True,
            full=plan.top_k == -1,
        )

    def _prefix(self, plan: CallPlan, ids: list[int], m: int, job_id: str, principal) -> asyncio.Future:
        """The future scores of positions 1..m-1 of the prefix ids[:m] (one request for every prompt sharing it)."""
        req = ScoreRequest(ids[:1], ids[1:m], keep_sequence=True, **self._base(plan, job_id))
        key = (tuple(ids[:m]), plan.row_k, plan.temperature, plan.top_k == -1)
        return self.prefixes.get(key, lambda: self._submit(req, principal))

    def _main_request(self, plan: CallPlan, p: PromptWork, boundary: int, job_id: str) -> ScoreRequest:
        """The request scoring positions boundary..n-1 (and drawing the first generated token)."""
        gen = plan.max_tokens >= 1
        completion = p.ids[boundary:] + ([PLACEHOLDER] if gen else [])
        cand = None
        if p.candidates is not None:  # rows from p.start == boundary; -1 padding scored at id 0, masked later
            cand = np.where(p.candidates < 0, 0, p.candidates)
            if gen:
                cand = np.concatenate([cand, np.zeros((1, cand.shape[1]), np.int64)])
        return ScoreRequest(
            p.ids[:boundary],
            completion,
            candidate_ids=cand,
            sample_last=gen,
            greedy=plan.greedy,
            seed=plan.seed,
            **self._base(plan, job_id),
        )

    async def score_prompt(
        self, plan: CallPlan, p: PromptWork, m: int, job_id: str, principal
    ) -> PromptScores:
        n = len(p.ids)
        out = PromptScores.empty(n, plan.row_k)
        scored = plan.scores_prompt and p.start < n
        if not scored and plan.max_tokens == 0:
            return out
        shares = scored and m > p.start and p.candidates is None and plan.top_k != -1
        boundary = m if shares else (p.start if scored else n)
        prefix = self._prefix(plan, p.ids, m, job_id, principal) if shares else None
        res = await self._submit(self._main_request(plan, p, boundary, job_id), principal)
        if prefix is not None:
            out.fill(await asyncio.shield(prefix), 1, m - 1, skip_before=p.start)
        if scored:
            out.fill(res, boundary, n - boundary)
        else:
            out.reused += res.prompt_tokens_reused
        if plan.max_tokens >= 1:
            out.generated.append(generated_of(res))
            await self._generate(plan, p.ids, out, job_id, principal)
        return out

    async def _generate(
        self, plan: CallPlan, ids: list[int], out: PromptScores, job_id: str, principal
    ) -> None:
        """Tokens 2..max_tokens, one request each (the sequence so far as the prompt), until end of sequence."""
        base = {**self._base(plan, job_id), "full": False}
        base["top_k"] = max(plan.sample_logprobs or 0, 0)
        while True:
            if out.generated[-1].token_id == self.eos_token_id and not plan.ignore_eos:
                out.finish_reason = "stop"
                return
            if len(out.generated) >= plan.max_tokens:
                out.finish_reason = "length"
                return
            seq = ids + [g.token_id for g in out.generated]
            seed = None if plan.seed is None else (plan.seed + len(out.generated)) & (2**63 - 1)
            req = ScoreRequest(seq, [PLACEHOLDER], sample_last=True, greedy=plan.greedy, seed=seed, **base)
            res = await self._submit(req, principal)
            out.generated.append(generated_of(res))
