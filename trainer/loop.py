"""The training loop: `train(cfg) -> RunSummary`, on one process or as one rank of `torchrun` (DDP).

`train` reads like the method; each stage is a function of its own:
  set_up             load the student, connect to the teacher and check it, load the prompts, resume if asked;
  prepare_minibatch  L = prefix_length(step); draw `batch_size` prompts (this rank's data RNG),
                     `samples_per_prompt` rollouts each; sample them micro-batch by micro-batch and send each
                     micro-batch's requests to the teacher as soon as it is sampled, so the next one is sampled
                     while the teacher scores it (the weights do not change within a step, so every rollout is
                     strictly on-policy);
  train_step         as the teacher's scores arrive, forward + backward each micro-batch (gradients accumulate;
                     DDP averages them across ranks on the last one), loss normalised by the step's number of
                     trained tokens; then clip, set the learning rate, AdamW step;
  log_step           progress/ loss/ teacher/ flops/ time/ metrics (sums across ranks);
  evaluate_now       every eval.every steps and at both ends (rank 0);
  save               a checkpoint every save_every steps; `finish` writes the final model.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from trainer import checkpoint as ckpt_mod
from trainer.config import TrainConfig
from trainer.distributed import setup_dist, weights_digest
from trainer.evaluate import evaluate
from trainer.flops import StepFlops, step_flops
from trainer.losses import compute_loss, sampled_kl_estimate
from trainer.sampling import Rollouts, generate, student_logprobs
from trainer.schedule import learning_rate, prefix_length
from trainer.setup import Run, set_up
from trainer.summary import RunSummary, summarize
from trainer.teacher_io import build_requests, to_teacher_batch

__all__ = ["RunSummary", "summarize", "train"]

log = logging.getLogger(__name__)


@dataclass
class Minibatch:
    """One step's rollouts, micro-batch by micro-batch, each with the future of its teacher scores."""

    L: int
    """The step's prefix length: rollouts run at most this many tokens."""
    lr: float
    prompts: list[list[int]]
    """The step's prompts (each repeated samples_per_prompt times), in rollout order."""
    pending: list[tuple[Rollouts, Future]]
    sample_s: float
    """Seconds spent sampling."""

    @property
    def n_tokens(self) -> float:
        """Trained (generated) tokens of the step on this rank: the loss normaliser."""
        return sum(float(ro.mask_BT.sum()) for ro, _ in self.pending)


@dataclass
class StepResult:
    """What a train step measured on this rank."""

    loss_sum: float = 0.0
    """Sum of the per-token losses."""
    kl_sum: float = 0.0
    """Sum of the Monte-Carlo per-token reverse KL estimates."""
    gap_max: float = 0.0
    """Largest |training-time log p_S(x) - sampling-time log p_S(x)| (0 up to numerics: on-policy)."""
    wait_s: float = 0.0
    """Seconds spent waiting for the teacher's scores."""
    train_s: float = 0.0
    """Seconds spent in forward, backward and the optimizer step."""
    grad_norm: float = 0.0
    """Global gradient norm before clipping."""


def prepare_minibatch(run: Run, step: int) -> Minibatch:
    """Sample and submit: the step's rollouts, each micro-batch sent to the teacher as soon as it exists."""
    cfg = run.cfg
    L = prefix_length(cfg.prefix, step, cfg.steps, cfg.max_new_tokens)
    lr = learning_rate(step, cfg.steps, peak=cfg.lr, warmup_steps=cfg.warmup_steps, kind=cfg.lr_schedule)
    idx = run.data_rng.choice(
        len(run.train_ids), size=cfg.batch_size, replace=len(run.train_ids) < cfg.batch_size
    )
    prompts = [run.train_ids[i] for i in idx for _ in range(cfg.samples_per_prompt)]
    pending, sample_s = [], 0.0
    for s in range(0, len(prompts), cfg.micro_batch_size):
        ts = time.perf_counter()
        ro = generate(
            run.model,
            prompts[s : s + cfg.micro_batch_size],
            L,
            eos_id=run.eos if cfg.stop_at_eos else None,
            pad_id=run.pad,
            temperature=cfg.temperature,
            generator=run.sampler,
            autocast_dtype=run.autocast,
        )
        sample_s += time.perf_counter() - ts
        reqs = build_requests(
            ro, need=run.need, job_id=run.job_id, top_k=cfg.top_k, temperature=cfg.teacher_temperature
        )
        pending.append((ro, run.teacher.submit(reqs)))
    return Minibatch(L, lr, prompts, pending, sample_s)


def _train_micro_batch(run: Run, ro: Rollouts, fut: Future, *, sync: bool, n_tokens: float, res: StepResult):
    """Waits for one micro-batch's scores, then forward + backward on it (gradients accumulate)."""
    tw = time.perf_counter()
    results = fut.result()
    res.wait_s += time.perf_counter() - tw
    tt = time.perf_counter()
    tb = to_teacher_batch(results, ro.ids_BT.shape[1], run.device, run.need, run.vocab)
    mask_BT = ro.mask_BT.to(run.device)
    ids_BT = ro.ids_BT.to(run.device)
    with contextlib.nullcontext() if sync else run.ddp.no_sync():
        s_lp_BTV = student_logprobs(run.trained, ro, autocast_dtype=run.autocast)
        loss = compute_loss(
            run.cfg.loss, s_lp_BTV, ids_BT, tb, mask_BT, beta=run.cfg.jsd_beta, reduction="sum"
        )
        (loss / max(1.0, n_tokens)).backward()
    with torch.no_grad():
        s_tok_BT = s_lp_BTV.detach().gather(-1, ids_BT.unsqueeze(-1)).squeeze(-1)
        res.kl_sum += float(sampled_kl_estimate(s_tok_BT, tb.token_lp_BT, mask_BT, "sum"))
        gap = ((s_tok_BT.cpu() - ro.sample_lp_BT).abs() * ro.mask_BT).max()
        res.gap_max = max(res.gap_max, float(gap))
    res.loss_sum += float(loss.detach())
    res.train_s += time.perf_counter() - tt


def train_step(run: Run, mb: Minibatch) -> StepResult:
    """Train on the scores: each micro-batch as its scores arrive, then one optimizer step."""
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    res, n_tokens = StepResult(), mb.n_tokens
    for c, (ro, fut) in enumerate(mb.pending):
        sync = run.ddp is None or c == len(mb.pending) - 1  # DDP all-reduces on the last micro-batch only
        _train_micro_batch(run, ro, fut, sync=sync, n_tokens=n_tokens, res=res)
    tt = time.perf_counter()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip or float("inf"))
    for group in run.optimizer.param_groups:
        group["lr"] = mb.lr
    run.optimizer.step()
    res.train_s += time.perf_counter() - tt
    res.grad_norm = float(grad_norm)
    return res


def log_step(run: Run, done: int, mb: Minibatch, res: StepResult, t_step: float) -> None:
    """Sums the step's counts over ranks, adds its FLOPs to the run's, and logs the step's metrics (rank 0)."""
    cfg, eos = run.cfg, run.eos
    lens = [n for ro, _ in mb.pending for n in ro.lengths]
    eos_hits = sum(
        int(eos is not None and ro.ids_BT[i, n - 1] == eos)
        for ro, _ in mb.pending
        for i, n in enumerate(ro.lengths)
    )
    sf = step_flops(run.s_dims, run.t_dims, [len(p) for p in mb.prompts], lens)
    loss_sum, kl_sum, n_tokens, rollouts, eos_hits, *flops = run.dd.sum(
        [res.loss_sum, res.kl_sum, mb.n_tokens, float(len(lens)), float(eos_hits)]
        + [float(sf.sampling), float(sf.training), float(sf.teacher)]
    )
    sf = StepFlops(*(int(f) for f in flops))
    run.cum = run.cum + sf
    if not run.dd.main:
        return
    metrics = {
        "progress/step": done,
        "progress/prefix_length": mb.L,
        "progress/lr": mb.lr,
        "progress/rollouts": rollouts,
        "progress/completion_tokens": n_tokens / rollouts,
        "progress/eos_rate": eos_hits / rollouts,
        f"loss/{cfg.loss}": loss_sum / max(1.0, n_tokens),
        "loss/reverse_kl_mc": kl_sum / max(1.0, n_tokens),
        "loss/grad_norm": res.grad_norm,
        "loss/sample_logprob_gap": res.gap_max,
        **run.teacher.stats.take(),
        "teacher/wait_s": res.wait_s,
        **sf.as_metrics("flops/"),
        **run.cum.as_metrics("flops/cum_"),
        "time/sample_s": mb.sample_s,
        "time/train_s": res.train_s,
        "time/step_s": time.perf_counter() - t_step,
        "time/elapsed_s": time.perf_counter() - run.t_start,
    }
    run.writer.log(done, metrics)
    run.progress.update(done, f"L={mb.L} kl={metrics['loss/reverse_kl_mc']:.3f}")


def evaluate_now(run: Run, step: int) -> None:
    """Held-out evaluation after `step` steps on rank 0 (the other ranks wait): eval/ metrics and samples."""
    cfg, ev = run.cfg, run.cfg.eval
    if run.dd.main and run.held_ids:
        run.progress.note(f"evaluating at step {step} on {len(run.held_ids)} held-out prompts ...")
        result = evaluate(
            run.model,
            run.tokenizer,
            run.held_ex,
            run.held_ids,
            run.teacher,
            max_new_tokens=ev.max_new_tokens,
            batch_size=ev.batch_size,
            head_tokens=ev.head_tokens,
            full_rows=run.eval_full_rows,
            top_k=run.eval_top_k,
            vocab=run.vocab,
            job_id=run.job_id,
            teacher_temperature=cfg.teacher_temperature,
            n_samples=ev.samples,
            autocast_dtype=run.autocast,
        )
        run.writer.log(step, {"progress/step": step, **result.metrics, **run.cum.as_metrics("flops/cum_")})
        run.teacher.stats.take()  # eval traffic is not training traffic
        run.writer.log_samples(step, result.samples)
        shown = ("eval/accuracy", "eval/kl_head", "eval/kl_tail")
        run.progress.note(
            "  " + "  ".join(f"{k[5:]}={v:.4g}" for k, v in result.metrics.items() if k in shown)
        )
    run.dd.barrier()


def save(run: Run, done: int) -> None:
    """A checkpoint after `done` steps (collective: every rank writes its RNG state)."""
    cum = run.cum
    ckpt_mod.save_checkpoint(
        run.out,
        done,
        model=run.model,
        tokenizer=run.tokenizer,
        optimizer=run.optimizer,
        extra={
            "cumulative_flops": {"sampling": cum.sampling, "training": cum.training, "teacher": cum.teacher},
            "config": run.cfg.to_dict(),
        },
        rng=ckpt_mod.rng_state(run.data_rng, run.sampler),
        rank=run.dd.rank,
        world_size=run.dd.world,
        barrier=run.dd.barrier,
        keep=run.cfg.keep_checkpoints,
    )


def finish(run: Run) -> None:
    """The last evaluation and the final model (output_dir/final); under DDP each rank's weights digest."""
    out = run.out
    finished_before = run.resumed_from is not None and run.start >= run.cfg.steps and (out / "final").exists()
    if not finished_before:  # resuming a finished run only re-reads its summary
        evaluate_now(run, run.cfg.steps)
    if run.dd.on:
        (out / f"weights_digest.rank{run.dd.rank}.txt").write_text(weights_digest(run.model) + "\n")
    if run.dd.main:
        run.model.save_pretrained(out / "final")
        run.tokenizer.save_pretrained(out / "final")
    run.dd.barrier()


def train(cfg: TrainConfig, *, resume: bool = False) -> RunSummary:
    """Runs the distillation described by `cfg`; with `resume`, continues from the newest checkpoint."""
    t_start = time.perf_counter()
    dd, device = setup_dist(cfg.device)
    with contextlib.ExitStack() as closing:  # the teacher connection, metrics files, progress bar
        run = set_up(cfg, dd, device, resume=resume, t_start=t_start, closing=closing)
        if run.start == 0 and cfg.eval.at_start:
            evaluate_now(run, 0)
        for step in range(run.start, cfg.steps):
            t_step = time.perf_counter()
            mb = prepare_minibatch(run, step)
            res = train_step(run, mb)
            done = step + 1
            log_step(run, done, mb, res, t_step)
            if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.steps:
                evaluate_now(run, done)
            if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
                save(run, done)
        finish(run)
    summary = summarize(run.out)
    summary.wall_s = time.perf_counter() - t_start
    dd.close()
    return summary
