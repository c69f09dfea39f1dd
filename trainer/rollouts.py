"""Rollout preparation: each step's rollouts, who writes them, how far they run, and what trains each position.

Source (config `rollouts.source`):
  student  on-policy: the student samples (the method itself);
  teacher  off-policy: a local copy of the teacher model samples with the same `generate`, the run's sampler RNG
           and temperature; the teacher service still scores them and the same loss trains on them;
  gold     the task's reference answers (`Example.answer`), tokenized as is, EOS appended, cut to the row's limit.

Length: every rollout runs to the step's prefix length L, except the first round(anchor.tail_fraction x n) of
the step's n rollouts on this rank, which run to max_new_tokens (when L < max_new_tokens): the tail rollouts.

Positions: each rollout's positions are split into a head, trained with the configured loss (and scored by the
teacher unless the loss needs nothing from it), and a tail, trained with the KL to the reference policy. The
tail is empty except for tail rollouts under anchor.tail_target=reference, whose head is their first L positions
(the teacher is sent only those) and whose tail is the rest. Every generated position is in one of the two, so
the step's loss normaliser (its number of trained tokens) is the number of generated tokens.

Candidates (losses whose Need asks for candidates): each scored position also names the student's own
top-`candidates` ids; the student records them while it samples (no extra pass); rollouts written by a teacher
copy or the gold answers get them from one forward pass of the student without gradient.

Each micro-batch's requests go to the teacher as soon as it is written, so the next micro-batch is sampled while
the teacher scores it (the weights do not change within a step: on-policy rollouts are strictly on-policy).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.teacher.modelinfo import tokenizer_fingerprint
from services.teacher.types import ModelInfo
from trainer.config import ConfigError, TrainConfig
from trainer.flops import ModelDims, RolloutTokens, dims_from_model
from trainer.losses import Need
from trainer.sampling import Rollouts, from_completions, generate, student_logprobs
from trainer.schedule import learning_rate, prefix_length
from trainer.tasks import Example
from trainer.teacher_io import build_requests

if TYPE_CHECKING:  # the Run is built by trainer.setup, which imports this module
    from trainer.setup import Run


@dataclass
class MicroBatch:
    """Rollouts written, scored and trained together, with the split of their positions."""

    ro: Rollouts
    head_BT: torch.Tensor
    """(B, T) 1.0 where the configured loss trains (the positions the teacher scores)."""
    tail_BT: torch.Tensor
    """(B, T) 1.0 where the KL to the reference policy trains (tail rollouts under tail_target=reference)."""
    scores: Future | None
    """The teacher's scores of the head positions; None when the loss needs nothing from the teacher."""

    def tokens(self, *, sampled: bool, scored: bool) -> list[RolloutTokens]:
        """Each rollout's token counts for the FLOP formula (`sampled`: written by a model, not gold;
        `scored`: the teacher scored the head)."""
        reused = [0] * len(self.ro.prompt_ids)  # prompt tokens the teacher reported reusing, per rollout
        if scored and self.scores is not None:
            reused = [r.prompt_tokens_reused for r in self.scores.result()]
        out = []
        for i, (p, n) in enumerate(zip(self.ro.prompt_ids, self.ro.lengths, strict=True)):
            head, tail = int(self.head_BT[i].sum()), int(self.tail_BT[i].sum())
            out.append(
                RolloutTokens(
                    prompt=len(p),
                    sampled=n if sampled else 0,
                    scored=head if scored else 0,
                    trained=n,
                    reference=n if tail else 0,
                    teacher_reused=reused[i] if scored else 0,
                )
            )
        return out


@dataclass
class Minibatch:
    """One step's rollouts, micro-batch by micro-batch."""

    L: int
    """The step's prefix length: rollouts other than the tail rollouts run at most this many tokens."""
    lr: float
    prompts: list[list[int]]
    """The step's prompts (each repeated samples_per_prompt times), in rollout order."""
    micro: list[MicroBatch]
    tail_rollouts: int
    """Rollouts that ran to max_new_tokens instead of L (0 when L = max_new_tokens)."""
    sample_s: float
    """Seconds spent writing rollouts."""

    @property
    def n_tokens(self) -> float:
        """Trained (generated) tokens of the step on this rank: the loss normaliser."""
        return sum(float(m.ro.mask_BT.sum()) for m in self.micro)


def tail_count(n_rollouts: int, fraction: float) -> int:
    """How many of a step's `n_rollouts` are tail rollouts: round(fraction x n_rollouts) (Python's round)."""
    return round(fraction * n_rollouts)


def row_limits(n_rollouts: int, L: int, max_new_tokens: int, fraction: float) -> list[int]:
    """Each rollout's length limit: max_new_tokens for the first tail_count rollouts (when L < max_new_tokens),
    L for the others."""
    n_tail = tail_count(n_rollouts, fraction) if L < max_new_tokens else 0
    return [max_new_tokens] * n_tail + [L] * (n_rollouts - n_tail)


def split_positions(
    ro: Rollouts, limits: list[int], L: int, anchor_tails: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(head (B, T), tail (B, T)) masks of a micro-batch: with `anchor_tails`, a row allowed beyond L keeps its
    first L positions in the head and the rest in the tail; every other row is all head."""
    tail_BT = torch.zeros_like(ro.mask_BT)
    if anchor_tails:
        for i, limit in enumerate(limits):
            if limit > L:
                tail_BT[i, L:] = ro.mask_BT[i, L:]
    return ro.mask_BT - tail_BT, tail_BT


class RolloutSource:
    """Writes rollouts: the student's samples, a local teacher copy's samples, or gold answers."""

    def __init__(self, kind: str, model: torch.nn.Module | None, gold: list[list[int]] | None = None) -> None:
        assert (model is None) == (kind == "gold") and (gold is None) == (kind != "gold"), kind
        self.kind = kind
        self.model = model
        """The sampling model (the student's own for kind student; None for gold)."""
        self.gold = gold
        """Per training prompt: its tokenized gold answer with EOS (kind gold)."""
        self.dims: ModelDims | None = None if model is None else dims_from_model(model)
        """FLOP dims of the sampling model (None: nothing is sampled)."""

    @property
    def on_policy(self) -> bool:
        return self.kind == "student"

    def write(self, run: Run, rows: list[int], limits: list[int]) -> Rollouts:
        """Rollouts for training prompts `rows` (indices into run.train_ids), each at most its limit long."""
        prompts = [run.train_ids[i] for i in rows]
        if self.gold is not None:
            return from_completions(
                prompts, [self.gold[i][:n] for i, n in zip(rows, limits, strict=True)], run.pad
            )
        cfg = run.cfg
        return generate(
            self.model,
            prompts,
            limits,
            eos_id=run.eos if cfg.stop_at_eos else None,
            pad_id=run.pad,
            temperature=cfg.temperature,
            generator=run.sampler,
            autocast_dtype=run.autocast,
            candidates=cfg.candidates if run.need.asks_candidates and self.on_policy else 0,
        )


@torch.no_grad()
def with_student_candidates(run: Run, ro: Rollouts) -> Rollouts:
    """`ro` with the student's top-`candidates` ids at every position (`cand_ids_BTC`, (B, T, C)): as recorded
    while the student sampled, else from a forward pass of the student (rollouts it did not write)."""
    if ro.cand_ids_BTC is None:
        lp_BTV = student_logprobs(run.model, ro, autocast_dtype=run.autocast)  # (B, T, V)
        ro.cand_ids_BTC = lp_BTV.topk(run.cfg.candidates, dim=-1).indices.cpu()  # (B, T, C)
    return ro


def teacher_model_path(cfg: TrainConfig, info: ModelInfo) -> str:
    """The folder of the sampling model of source=teacher: `rollouts.model`, else the teacher's advertised model
    id when it is a folder here, else the MODEL of `teacher: inprocess:MODEL`."""
    if cfg.rollouts.model:
        return cfg.rollouts.model
    if Path(info.model_id).is_dir():
        return info.model_id
    if cfg.teacher.startswith("inprocess:"):
        return cfg.teacher.split(":", 1)[1]
    raise ConfigError(
        f"`rollouts.model` is required with rollouts.source=teacher: the teacher's model id {info.model_id!r} "
        "is not a folder on this machine; give the folder of a local copy of the teacher."
    )


def _teacher_sampler(cfg: TrainConfig, info: ModelInfo, tokenizer, vocab: int, device) -> torch.nn.Module:
    """The local copy of the teacher that writes off-policy rollouts (frozen, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = teacher_model_path(cfg, info)
    try:
        theirs = tokenizer_fingerprint(AutoTokenizer.from_pretrained(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as err:
        raise ConfigError(f"`rollouts.model` {path!r} cannot be loaded: {err}") from None
    if theirs != tokenizer_fingerprint(tokenizer) or model.get_output_embeddings().weight.shape[0] != vocab:
        raise ConfigError(
            f"`rollouts.model` {path!r} must share the student's tokenizer and vocabulary (its rollouts are "
            "trained on token by token)."
        )
    return model.to(device).eval().requires_grad_(False)


def _gold_answers(cfg: TrainConfig, train_ex: list[Example], tokenizer) -> list[list[int]]:
    """Each training prompt's gold answer as token ids, EOS appended (when the tokenizer has one)."""
    missing = sum(ex.answer is None for ex in train_ex)
    if missing:
        raise ConfigError(
            f"`rollouts.source` is 'gold' but {missing} of the {len(train_ex)} training prompts of "
            f"{cfg.prompts!r} have no answer; give a task with answers or another source."
        )
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    gold = [list(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) + eos for ex in train_ex]
    if not all(gold):
        raise ConfigError("`rollouts.source` is 'gold' but an answer tokenizes to nothing.")
    return gold


def build_source(
    cfg: TrainConfig, info: ModelInfo, tokenizer, student, train_ex: list[Example], vocab: int, device
) -> RolloutSource:
    """The run's RolloutSource for `rollouts.source` (a teacher copy is loaded onto `device`)."""
    kind = cfg.rollouts.source
    if kind == "teacher":
        return RolloutSource(kind, _teacher_sampler(cfg, info, tokenizer, vocab, device))
    if kind == "gold":
        return RolloutSource(kind, None, _gold_answers(cfg, train_ex, tokenizer))
    return RolloutSource(kind, student)


def prepare_minibatch(run: Run, step: int) -> Minibatch:
    """Write and submit: the step's rollouts, each micro-batch sent to the teacher as soon as it exists."""
    cfg = run.cfg
    L = prefix_length(cfg.prefix, step, cfg.steps, cfg.max_new_tokens)
    lr = learning_rate(step, cfg.steps, peak=cfg.lr, warmup_steps=cfg.warmup_steps, kind=cfg.lr_schedule)
    idx = run.data_rng.choice(
        len(run.train_ids), size=cfg.batch_size, replace=len(run.train_ids) < cfg.batch_size
    )
    rows = [int(i) for i in idx for _ in range(cfg.samples_per_prompt)]
    limits = row_limits(len(rows), L, cfg.max_new_tokens, cfg.anchor.tail_fraction)
    anchor_tails = cfg.anchor.tail_target == "reference"
    micro, sample_s = [], 0.0
    for s in range(0, len(rows), cfg.micro_batch_size):
        ts = time.perf_counter()
        lim = limits[s : s + cfg.micro_batch_size]
        ro = run.source.write(run, rows[s : s + cfg.micro_batch_size], lim)
        if run.need.asks_candidates:
            ro = with_student_candidates(run, ro)
        sample_s += time.perf_counter() - ts
        head_BT, tail_BT = split_positions(ro, lim, L, anchor_tails)
        scores = None
        if run.need != Need.NONE:
            reqs = build_requests(
                ro,
                need=run.need,
                job_id=run.job_id,
                top_k=cfg.top_k,
                temperature=cfg.teacher_temperature,
                scored=[int(n) for n in head_BT.sum(1).tolist()],
            )
            scores = run.teacher.submit(reqs)
        micro.append(MicroBatch(ro, head_BT, tail_BT, scores))
    n_tail = sum(n > L for n in limits)
    return Minibatch(L, lr, [run.train_ids[i] for i in rows], micro, n_tail, sample_s)
