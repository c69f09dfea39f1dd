"""Everything the trainer says to the teacher: connecting, the compatibility check, requests and results.

The async client runs on an event loop in a background thread, so the training thread can hand a micro-batch's
requests to the teacher (`TeacherIO.submit` returns a future at once) and go on sampling the next micro-batch
while the teacher scores this one. Retries are the client's alone (`services.teacher.client`: each unanswered
request is sent again on UNAVAILABLE or on back-pressure, honouring the teacher's retry-after hint); what still
fails after them fails the step. The client gives each request its wire id and answers in request order.

`teacher: inprocess:MODEL` swaps the service for `InProcessTeacher`, the same async API over an in-process
engine: for trials without Redis and for unit tests of the trainer itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from services.teacher.client import ClientOptions, TeacherClient
from services.teacher.errors import TeacherError
from services.teacher.modelinfo import tokenizer_fingerprint
from services.teacher.types import ModelInfo, ScoreRequest, ScoreResult
from trainer.flops import ModelDims
from trainer.losses import Need, TeacherBatch
from trainer.sampling import Rollouts

log = logging.getLogger(__name__)


class TeacherMismatch(ValueError):
    """The teacher cannot serve this student (tokenizer, vocabulary or a capability the loss needs)."""


class InProcessTeacher:
    """The TeacherClient API over an engine in this process (no Redis, no gRPC)."""

    def __init__(self, model: str, *, dtype: str = "float32", device: str = "cpu") -> None:
        from services.teacher.engine import load_engine

        self.engine = load_engine(model, dtype=dtype, device=device)
        self._lock: asyncio.Lock | None = None

    async def model_info(self) -> ModelInfo:
        return self.engine.info

    async def score_many(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one engine, one forward at a time
            results = await asyncio.to_thread(self.engine.score, requests)
        for res in results:
            if isinstance(res, TeacherError):
                raise res
        return results

    async def score(self, request: ScoreRequest) -> ScoreResult:
        (res,) = await self.score_many([request])
        return res

    async def close(self) -> None:
        return None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


@dataclass
class TeacherStats:
    """Counters of the teacher traffic since the last `take()`."""

    requests: int = 0
    tokens: int = 0
    batches: int = 0
    latency_s: float = 0.0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self) -> dict[str, float]:
        """`teacher/*` metrics of the traffic since the previous call, and a reset."""
        with self.lock:
            n = max(1, self.requests)
            out = {
                "teacher/requests": float(self.requests),
                "teacher/tokens_scored": float(self.tokens),
                "teacher/latency_s": self.latency_s / max(1, self.batches),
                "teacher/queue_ms": self.queue_ms / n,
                "teacher/compute_ms": self.compute_ms / n,
                "teacher/retries": float(self.retries),
            }
            self.requests = self.tokens = self.batches = self.retries = 0
            self.latency_s = self.queue_ms = self.compute_ms = 0.0
        return out


class TeacherIO:
    """A teacher client living on its own event-loop thread; `submit` returns concurrent futures."""

    def __init__(self, target: str, options: ClientOptions | None = None, *, device: str = "cpu") -> None:
        """`target`: grpc://host:port, host:port, or inprocess:MODEL (an engine on `device`, no service)."""
        self.target = target
        self.stats = TeacherStats()
        self._retries_seen = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-io", daemon=True)
        self._thread.start()
        try:
            self.client = self._run(self._connect(target, options or ClientOptions(), device))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _connect(target: str, options: ClientOptions, device: str):
        if target.startswith("inprocess:"):  # on the student's device
            return InProcessTeacher(target.split(":", 1)[1], device=device)
        return TeacherClient(target, options)

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def model_info(self) -> ModelInfo:
        return self._run(self.client.model_info())

    async def _score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        t0 = time.perf_counter()
        results = await self.client.score_many(requests)
        assert len(results) == len(requests), "the teacher must answer every request"
        with self.stats.lock:
            s = self.stats
            retried = self._client_retries()  # the client's running total: count each retry once
            s.retries += retried - self._retries_seen
            self._retries_seen = retried
            s.batches += 1
            s.requests += len(requests)
            s.tokens += sum(int(r.completion_token_ids.size) for r in requests)
            s.latency_s += time.perf_counter() - t0
            s.queue_ms += sum(float(r.queue_ms) for r in results)
            s.compute_ms += sum(float(r.compute_ms) for r in results)
        return results

    def _client_retries(self) -> int:
        stats = getattr(self.client, "stats", None)  # the in-process teacher never retries
        return stats.retried if stats is not None else 0

    def submit(self, requests: list[ScoreRequest]) -> concurrent.futures.Future:
        """Sends `requests` now; the future yields their results in request order."""
        return asyncio.run_coroutine_threadsafe(self._score(requests), self._loop)

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        return self.submit(requests).result()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def close(self) -> None:
        try:
            self._run(self.client.close(), timeout=10)
        except Exception as err:  # closing must never mask the run's own outcome
            log.warning("closing the teacher client failed: %s", err)
        self._stop_loop()


class CallAbandoned(Exception):
    """Raised in place of a teacher answer that the caller of an `AbandonableTeacher` no longer waits for."""


class AbandonableTeacher:
    """`TeacherIO.score` for one caller who may leave (an HTTP client of the analysis routes): `abandon()`
    cancels the calls in flight (a cancelled gRPC call has the teacher withdraw its still-queued requests) and
    makes every later `score` raise CallAbandoned, so a long analysis stops making the teacher work."""

    def __init__(self, io: TeacherIO) -> None:
        self.io = io
        self._lock = threading.Lock()
        self._inflight: set[concurrent.futures.Future] = set()
        self.abandoned = False

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        with self._lock:
            if self.abandoned:
                raise CallAbandoned("the caller left")
            fut = self.io.submit(requests)
            self._inflight.add(fut)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise CallAbandoned("the caller left") from None
        finally:
            with self._lock:
                self._inflight.discard(fut)

    def abandon(self) -> None:
        with self._lock:
            self.abandoned = True
            for fut in self._inflight:
                fut.cancel()


def check_teacher(
    info: ModelInfo,
    tokenizer,
    student_vocab: int,
    *,
    student: str,
    need: Need,
    top_k: int = 0,
    candidates: int = 0,
) -> None:
    """Refuses a teacher this student cannot be distilled from, with a message saying why and what to do."""
    fp = tokenizer_fingerprint(tokenizer)
    if info.tokenizer_fingerprint != fp:
        theirs = info.tokenizer_fingerprint[:12] or "(none advertised)"
        raise TeacherMismatch(
            f"the teacher {info.model_id!r} uses a different tokenizer than the student {student!r} "
            f"(tokenizer fingerprint {theirs} vs {fp[:12]}). Per-token distillation compares token ids, so a "
            "tokenizer mismatch would silently train on the wrong tokens; use a student and a teacher that share "
            "one tokenizer (e.g. the same model family)."
        )
    if need == Need.FULL:
        if not info.supports_full:
            raise TeacherMismatch(
                f"the loss needs full vocabulary rows but the teacher's {info.backend!r} backend "
                "cannot return them; use a *_topk loss or reverse_kl_sampled."
            )
        if info.vocab_size != student_vocab:
            raise TeacherMismatch(
                f"full-row losses need equal vocabulary sizes: teacher {info.vocab_size}, "
                f"student {student_vocab}; use a *_topk loss."
            )
    if need.asks_topk and info.vocab_size > student_vocab:
        raise TeacherMismatch(
            f"the teacher's vocabulary ({info.vocab_size}) is larger than the student's "
            f"({student_vocab}): its top-k ids could name tokens the student cannot represent."
        )
    if need.asks_topk and top_k > info.max_top_k:
        raise TeacherMismatch(f"`top_k` must be <= {info.max_top_k} (the teacher's max_top_k), got {top_k}.")
    if need.asks_candidates:
        _check_candidates(info, student_vocab, candidates)


def _check_candidates(info: ModelInfo, student_vocab: int, candidates: int) -> None:
    """The teacher can score `candidates` of the student's ids per position."""
    if info.max_candidates < 1:
        raise TeacherMismatch(
            f"the loss needs the teacher's log-probabilities at the student's candidate ids but the teacher's "
            f"{info.backend!r} backend cannot score candidate ids; use a *_topk loss or reverse_kl_sampled."
        )
    if candidates > info.max_candidates:
        raise TeacherMismatch(
            f"`candidates` must be <= {info.max_candidates} (the teacher's max_candidates), got {candidates}."
        )
    if info.vocab_size < student_vocab:
        raise TeacherMismatch(
            f"the student's vocabulary ({student_vocab}) is larger than the teacher's ({info.vocab_size}): "
            "its candidate ids could name tokens the teacher cannot score."
        )


def teacher_dims(info: ModelInfo) -> ModelDims | None:
    """FLOP dims of the teacher: advertised in its ModelInfo, else read from its config (no weights: a
    meta-device model); None when neither is available."""
    if info.flop_dims:
        return ModelDims(**info.flop_dims)
    try:
        from transformers import AutoConfig

        from services.models.dims import flop_dims_from_config

        return ModelDims(**flop_dims_from_config(AutoConfig.from_pretrained(info.model_id)))
    except Exception as err:  # a remote teacher's model id may not resolve here
        log.warning("teacher FLOPs are not counted: cannot read the config of %r (%s)", info.model_id, err)
        return None


def build_requests(
    rollouts: Rollouts,
    *,
    need: Need,
    job_id: str,
    top_k: int,
    temperature: float,
    full_dtype: str = "float32",
    scored: Sequence[int] | None = None,
) -> list[ScoreRequest]:
    """One ScoreRequest per rollout (prompt ids + its completion), asking for what `need` says; `top_k` is sent
    only when the top-k is needed, the rollouts' candidate ids (`cand_ids_BTC`) only when candidates are. `scored[i]`: only the first this many completion tokens of rollout i are
    sent (default: all). The client gives each request its id on the wire."""
    assert need != Need.NONE, "a loss that needs nothing from the teacher sends it no requests"
    n = len(rollouts.prompt_ids)
    keep = rollouts.lengths if scored is None else list(scored)
    assert len(keep) == n and all(1 <= k <= m for k, m in zip(keep, rollouts.lengths, strict=True)), keep
    cand = rollouts.cand_ids_BTC if need.asks_candidates else None
    assert not need.asks_candidates or cand is not None, "candidates are asked for but the rollouts have none"
    return [
        ScoreRequest(
            prompt_token_ids=np.asarray(rollouts.prompt_ids[i], dtype=np.int64),
            completion_token_ids=np.asarray(rollouts.completion(i)[: keep[i]], dtype=np.int64),
            job_id=job_id,
            top_k=top_k if need.asks_topk else 0,
            full=need == Need.FULL,
            temperature=temperature,
            full_dtype=full_dtype,
            candidate_ids=None if cand is None else cand[i, : keep[i]].numpy(),
        )
        for i in range(n)
    ]


def to_teacher_batch(
    results: list[ScoreResult],
    T: int,
    device,
    need: Need,
    vocab: int | None = None,
    cand_ids_BTC: torch.Tensor | None = None,
) -> TeacherBatch:
    """Pads the results of a micro-batch to (B, T[, K | C | V]) tensors; padded positions are masked by the loss.
    `cand_ids_BTC`: the candidate ids the requests named (needs that ask for candidates)."""
    B = len(results)
    token = np.zeros((B, T), dtype=np.float32)
    for i, r in enumerate(results):
        token[i, : r.token_logprobs.shape[0]] = r.token_logprobs
    batch = TeacherBatch(token_lp_BT=torch.from_numpy(token).to(device))
    if need.asks_topk:
        batch.topk_ids_BTK, batch.topk_lp_BTK = _padded_ids(
            [(r.top_k_ids, r.top_k_logprobs) for r in results], T, device
        )
    if need.asks_candidates:
        assert cand_ids_BTC is not None, "candidates need the candidate ids of the requests"
        batch.cand_ids_BTC, batch.cand_lp_BTC = _padded_ids(
            [
                (cand_ids_BTC[i, : r.candidate_logprobs.shape[0]].numpy(), r.candidate_logprobs)
                for i, r in enumerate(results)
            ],
            T,
            device,
        )
    if need == Need.FULL:
        assert vocab is not None
        full = np.full((B, T, vocab), -np.log(vocab), dtype=np.float32)
        for i, r in enumerate(results):
            rows = r.full_float32()
            full[i, : rows.shape[0]] = rows
        batch.full_lp_BTV = torch.from_numpy(full).to(device)
    return batch


def _padded_ids(
    rows: list[tuple[np.ndarray, np.ndarray]], T: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T, X), the teacher's log-probabilities (B, T, X)) of a micro-batch from each result's (ids (n, X),
    log-probabilities (n, X)), n <= T (the teacher's top-k, or the candidates the request named); positions the
    teacher did not score keep the ids 0..X-1 at log(1 / X) (masked by the loss)."""
    B, X = len(rows), rows[0][0].shape[1]
    ids = np.tile(np.arange(X, dtype=np.int64), (B, T, 1))
    lp = np.full((B, T, X), -np.log(X), dtype=np.float32)
    for i, (ids_nX, lp_nX) in enumerate(rows):
        n = lp_nX.shape[0]
        ids[i, :n], lp[i, :n] = ids_nX, lp_nX
    return torch.from_numpy(ids).to(device), torch.from_numpy(lp).to(device)
