"""The default engine: a Hugging Face `AutoModelForCausalLM` scoring many ragged sequences per forward pass.

Sequences are right-padded into one (B, S) batch with an attention mask and explicit position ids, so each
row computes exactly what it would alone; requests that share a prompt compute it once (engine/prompt_kv.py).
Only the hidden states of scored positions go through the LM head (in chunks bounded by memory; optionally in
float32 over a lower-precision trunk), then temperature, log_softmax in float32, gather (the completion token
and any candidate ids), top-k and optional full rows.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from services.teacher import codec
from services.teacher.engine import cpu_attention, cpu_heap, cpu_linear, cpu_topk, flat_reuse, prompt_kv
from services.teacher.engine.base import Engine
from services.teacher.modelinfo import build_model_info
from services.teacher.spec import EngineSpec
from services.teacher.types import ScoreRequest, ScoreResult

log = logging.getLogger("prefix_distill.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Rows of logits materialised at once, as elements (rows x vocab): 8M float32 = 32 MB, 170 rows of SmolLM2's
# vocabulary. On 2 cores 64 MB chunks scored 15% slower (each pass over a chunk left the cache), 4M elements
# as fast, 2M slower again (a thin LM-head GEMM).
LOGIT_CHUNK_ELEMENTS = 8 * 1024 * 1024
# The same on a GPU, where no cache is worth fitting: 64M float32 = 256 MB, 1,365 rows of SmolLM2's vocabulary.
# CPU-sized chunks there cost a dozen kernel launches per 170 rows and a thin GEMM each (on an H100 the engine
# ran at 0.89x the raw forward in bfloat16 with them); larger ones would only raise the peak memory.
GPU_LOGIT_CHUNK_ELEMENTS = 64 * 1024 * 1024


def logit_chunk_rows(device: torch.device, vocab_size: int) -> int:
    """Positions whose logits are materialised at once on `device` (at least one)."""
    budget = LOGIT_CHUNK_ELEMENTS if device.type == "cpu" else GPU_LOGIT_CHUNK_ELEMENTS
    return max(1, budget // vocab_size)


def resolve_device(device: str) -> torch.device:
    """'auto' picks cuda when available; an explicit 'cuda' without a GPU is a clear error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("`device` is 'cuda' but no CUDA device is available; use --device cpu.")
    return torch.device(device)


class HFEngine(Engine):
    """Teacher engine over transformers (CPU or CUDA; float32, bfloat16 or float16 weights)."""

    def __init__(self, spec: EngineSpec) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if spec.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {spec.dtype!r}.")
        self.device = resolve_device(spec.device)
        self.dtype = DTYPES[spec.dtype]
        self.keeps_heap = self.device.type == "cpu" and spec.cpu_keep_heap and cpu_heap.keep_heap()
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        self.model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=self.dtype).to(self.device).eval()
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        if spec.lm_head_dtype not in ("same", "float32"):
            raise ValueError(f"`lm_head_dtype` must be 'same' or 'float32', got {spec.lm_head_dtype!r}.")
        self.head_dtype = torch.float32 if spec.lm_head_dtype == "float32" else self.dtype
        if self.head_dtype != self.dtype:  # a float32 copy (a tied embedding stays in the trunk's dtype)
            self.lm_head = copy.deepcopy(self.lm_head).to(self.head_dtype)
        self.linear_kernels, linear_why = cpu_linear.choose_why(spec.cpu_linear, self.device, self.decoder)
        if self.linear_kernels == "onednn":
            cpu_linear.pack_linears(self.decoder)
        # the head chooses by its own shape and dtype (a vocabulary-wide projection, maybe float32 over bfloat16)
        if spec.cpu_linear != "torch" and self._head_on_bfloat16_units():
            self.lm_head, self.head_kernels = cpu_linear.BfloatValuedLinear(self.lm_head), "onednn bf16 units"
            head_why = "a float32 head over a bfloat16 trunk"
        else:
            self.head_kernels, head_why = cpu_linear.choose_why(spec.cpu_linear, self.device, self.lm_head)
        if self.head_kernels == "onednn":  # only ever chosen for a plain nn.Linear
            self.lm_head = cpu_linear.PackedLinear(self.lm_head)
        cfg = self.model.config.get_text_config()
        self.attention, attention_why = cpu_attention.apply(
            spec.cpu_attention, self.model, self.device, self.dtype
        )
        # one line, so a slow worker's log says at once which kernels a load-time probe gave it
        log.info(
            "kernels (%s, %s): linear %s (%s); lm_head %s (%s); attention %s (%s)",
            self.device.type,
            spec.dtype,
            self.linear_kernels,
            linear_why,
            self.head_kernels,
            head_why,
            self.attention,
            attention_why,
        )
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_scale = getattr(cfg, "logit_scale", None)
        # ModelInfo names the device actually used ("auto" resolved).
        self.info = build_model_info(
            replace(spec, device=self.device.type), self.model.config, self.tokenizer
        )
        assert self.lm_head.out_features == self.info.vocab_size, "lm_head rows must equal vocab_size"
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        # CPU only for now: on an H100 the reuse path (per-row key/value copies, small kernels) ran at 0.24-0.50x
        # the plain pass (docs/results/teacher_throughput.md), so a GPU engine computes every prompt.
        reuse = (
            spec.prompt_cache_mb > 0
            and self.device.type == "cpu"
            and prompt_kv.supports_reuse(self.model.config)
        )
        self.prompts = prompt_kv.PromptLRU(spec.prompt_cache_mb * 1024 * 1024) if reuse else None
        # reused prompts' completions packed into one pass, where the model hands keyword arguments to attention
        self.flat_reuse = reuse and flat_reuse.install(self.model)
        self.last_reused: list[int] = []  # prompt tokens each request of the last batch reused
        self.tokens_reused = 0  # all prompt tokens reused since start

    @property
    def reuses_prompts(self) -> bool:
        """Whether a prompt cache is set (`prompts`; bench/gpu_check.py sets one on a GPU engine to force reuse)."""
        return self.prompts is not None

    def _head_on_bfloat16_units(self) -> bool:
        """A float32 head over a bfloat16 trunk multiplies bfloat16 values (the trunk's hidden states, the
        model's weights): oneDNN's bfloat16 units compute it exactly up to summation order, where the CPU has
        them (engine/cpu_linear.py)."""
        return (
            self.device.type == "cpu"
            and self.dtype == torch.bfloat16
            and self.head_dtype == torch.float32
            and isinstance(self.lm_head, torch.nn.Linear)
            and cpu_linear.packs_bfloat16()
        )

    def _logits(self, hidden_NH: torch.Tensor) -> torch.Tensor:
        """Float32 logits (N, V) of hidden states (N, H), with the model's own final scaling/softcapping."""
        logits_NV = self.lm_head(hidden_NH.to(self.head_dtype)).float()
        if self.logit_scale is not None:
            logits_NV = logits_NV * self.logit_scale
        if self.softcap:
            logits_NV = torch.tanh(logits_NV / self.softcap) * self.softcap
        return logits_NV

    @torch.inference_mode()
    def forward(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        t0 = time.perf_counter()
        scores = self._score_positions(self._scored_hidden(requests), requests)
        results = self._results(requests, scores)
        compute_ms = (time.perf_counter() - t0) * 1000.0
        for res, reused in zip(results, self.last_reused, strict=True):
            res.compute_ms = compute_ms
            res.prompt_tokens_reused = reused
        return results

    def _scored_hidden(self, requests: Sequence[ScoreRequest]) -> torch.Tensor:
        """Hidden states (N, H) of the N positions that predict completion tokens, in request order: one padded
        pass, or with prompt reuse on, each distinct prompt computed once (engine/prompt_kv.py)."""
        if self.prompts is None:
            hidden_BSH, _ = prompt_kv.padded_pass(self.decoder, self.device, requests, keep_cache=False)
            self.last_reused = [0] * len(requests)
            return prompt_kv.scored_rows(hidden_BSH, requests)
        hidden_NH, self.last_reused, self.flat_reuse = prompt_kv.scored_hidden_with_reuse(
            self.decoder, self.device, requests, self.prompts, flat=self.flat_reuse
        )
        self.tokens_reused += sum(self.last_reused)
        return hidden_NH

    def _score_positions(self, hidden_NH: torch.Tensor, requests: Sequence[ScoreRequest]) -> _Scores:
        """Token logprobs, top-k, candidate logprobs and (where asked) full rows of every scored position, in
        logit chunks."""
        dev = self.device
        T = [r.completion_token_ids.size for r in requests]
        targets_N = torch.from_numpy(np.concatenate([r.completion_token_ids for r in requests])).to(dev)
        temps_N = torch.from_numpy(
            np.repeat(np.array([r.temperature for r in requests], dtype=np.float32), T)
        ).to(dev)
        unit_temps = all(r.temperature == 1.0 for r in requests)
        k_max = max(r.top_k for r in requests)
        # (N,) on the host: no device sync a chunk
        want_full_N = np.repeat(np.array([r.full for r in requests]), T)
        cand_ids_NM = _candidate_ids(requests).to(dev)  # (N, M), M the batch's largest num_candidates
        want_ranks = any(r.token_ranks for r in requests)
        draws = _draws(requests, T)  # position in the flat (N,) order -> the request drawing its token there

        N, V = hidden_NH.shape[0], self.info.vocab_size
        chunk = logit_chunk_rows(dev, V)
        token_lp_N = torch.empty(N, dtype=torch.float32, device=dev)
        topk_ids_NK = torch.empty((N, k_max), dtype=torch.int32, device=dev)
        topk_lp_NK = torch.empty((N, k_max), dtype=torch.float32, device=dev)
        cand_lp_NM = torch.empty(cand_ids_NM.shape, dtype=torch.float32, device=dev)
        ranks_N = torch.zeros(N if want_ranks else 0, dtype=torch.int32, device=dev)
        full_rows: dict[int, torch.Tensor] = {}  # start offset -> (C, V) float32 rows of that chunk
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            logits_CV = self._logits(hidden_NH[s:e])  # a fresh tensor: scaled in place, skipped at T = 1
            if not unit_temps:
                logits_CV.div_(temps_N[s:e, None])
            logprobs_CV = torch.log_softmax(logits_CV, dim=-1)
            for n in (
                n for n in draws if s <= n < e
            ):  # a one-token generation: the drawn token is the target
                targets_N[n] = _draw(logprobs_CV[n - s], draws[n])
            token_lp_N[s:e] = logprobs_CV.gather(1, targets_N[s:e, None]).squeeze(1)
            if want_ranks:  # 1 + ids strictly more likely than the token, as vLLM ranks prompt logprobs
                ranks_N[s:e] = (logprobs_CV > token_lp_N[s:e, None]).sum(1).to(torch.int32) + 1
            if k_max:
                vals, idx = cpu_topk.topk(logprobs_CV, k_max)
                topk_lp_NK[s:e], topk_ids_NK[s:e] = vals, idx.to(torch.int32)
            if cand_ids_NM.shape[1]:
                cand_lp_NM[s:e] = logprobs_CV.gather(1, cand_ids_NM[s:e])
            if want_full_N[s:e].any():
                full_rows[s] = logprobs_CV
        return _Scores(
            token_lp_N.cpu().numpy(),
            topk_ids_NK.cpu().numpy(),
            topk_lp_NK.cpu().numpy(),
            cand_lp_NM.cpu().numpy(),
            full_rows,
            chunk,
            ranks_N.cpu().numpy(),
            targets_N.cpu().numpy(),
        )

    def _results(self, requests: Sequence[ScoreRequest], scores: _Scores) -> list[ScoreResult]:
        """Cuts the flat (N, ...) scores into one result per request (full rows in their storage dtype)."""
        results = []
        offset, chunk = 0, scores.chunk
        for r in requests:
            t = r.completion_token_ids.size
            sl = slice(offset, offset + t)
            full = None
            if r.full:
                pieces = [  # each cast straight to its storage dtype: one copy of the rows, not two
                    codec.to_storage(
                        scores.full_rows[s][max(offset, s) - s : min(offset + t, s + chunk) - s], r.full_dtype
                    )
                    for s in range(offset // chunk * chunk, offset + t, chunk)
                ]
                full = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            results.append(
                ScoreResult(
                    request_id=r.request_id,
                    token_logprobs=scores.token_lp_N[sl].copy(),
                    top_k_ids=scores.topk_ids_NK[sl, : r.top_k].copy() if r.top_k else None,
                    top_k_logprobs=scores.topk_lp_NK[sl, : r.top_k].copy() if r.top_k else None,
                    full_logprobs=full,
                    full_dtype=r.full_dtype,
                    candidate_logprobs=(
                        scores.cand_lp_NM[sl, : r.num_candidates].copy() if r.num_candidates else None
                    ),
                    compute_ms=0.0,
                    batch_size=len(requests),
                    worker_id=self.worker_id,
                    token_ranks=scores.ranks_N[sl].copy() if r.token_ranks else None,
                    sampled_token_id=int(scores.targets_N[offset + t - 1]) if r.sample_last else None,
                )
            )
            offset += t
        return results


def _candidate_ids(requests: Sequence[ScoreRequest]) -> torch.Tensor:
    """(N, M) int64 candidate ids of every scored position, in request order: M the batch's largest
    num_candidates, shorter rows (and requests without candidates) padded with id 0, cut off in `_results`."""
    M = max(r.num_candidates for r in requests)
    rows = []
    for r in requests:
        ids_TM = np.zeros((r.completion_token_ids.size, M), dtype=np.int64)
        if r.num_candidates:
            ids_TM[:, : r.num_candidates] = r.candidate_ids
        rows.append(ids_TM)
    return torch.from_numpy(np.concatenate(rows))


def _draws(requests: Sequence[ScoreRequest], T: Sequence[int]) -> dict[int, ScoreRequest]:
    """The flat positions where a request draws its own last token (`sample_last`), with that request."""
    ends = np.cumsum(T) - 1
    return {int(ends[i]): r for i, r in enumerate(requests) if r.sample_last}


def _draw(logprobs_V: torch.Tensor, req: ScoreRequest) -> int:
    """The token a `sample_last` request generates from its row (V,) of logprobs at its temperature: the most
    likely one with `greedy`, else a draw (seeded by `seed` when given)."""
    if req.greedy:
        return int(torch.argmax(logprobs_V))
    gen = torch.Generator(device=logprobs_V.device)
    if req.seed is not None:
        gen.manual_seed(req.seed)
    else:
        gen.seed()
    return int(torch.multinomial(logprobs_V.exp(), 1, generator=gen))


class _Scores(NamedTuple):
    """The scores of all N positions of a batch, flat in request order."""

    token_lp_N: np.ndarray
    """(N,) float32 logprob of each completion token."""
    topk_ids_NK: np.ndarray
    """(N, K) int32, K the batch's largest top_k."""
    topk_lp_NK: np.ndarray
    """(N, K) float32."""
    cand_lp_NM: np.ndarray
    """(N, M) float32 logprobs at the candidate ids, M the batch's largest num_candidates (0 if none)."""
    full_rows: dict[int, torch.Tensor]
    """Chunk start offset -> (C, V) float32 logprob rows, only for chunks holding a full-row request."""
    chunk: int
    """Positions per logit chunk."""
    ranks_N: np.ndarray
    """(N,) int32 1-based rank of each scored token (empty when no request asked for ranks)."""
    targets_N: np.ndarray
    """(N,) int64 the token scored at each position (a drawn one where a request generates its last token)."""
