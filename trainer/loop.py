"""The training loop: `train(cfg) -> RunSummary`, on one process or as one rank of `torchrun` (DDP).

`train` reads like the method; each stage is a function of its own:
  set_up             load the student (freezing `freeze`), connect to the teacher and check it, load the prompts,
                     the rollout source and the anchors, resume if asked (trainer.setup);
  prepare_minibatch  L = prefix_length(step); draw `batch_size` prompts (this rank's data RNG),
                     `samples_per_prompt` rollouts each, written by the student, a teacher copy or the gold
                     answers, the first anchor.tail_fraction of them to full length; micro-batch by micro-batch,
                     each sent to the teacher as soon as it exists, so the next one is written while the teacher
                     scores it (trainer.rollouts);
  train_step         as the teacher's scores arrive, forward + backward each micro-batch (gradients accumulate;
                     DDP averages them across ranks on the last one): the configured loss on each rollout's
                     head, the KL to the starting student on anchored tails, normalised by the step's number of
                     trained tokens; then the L2 anchor's gradient, clip, set the learning rate, AdamW step;
  log_step           progress/ loss/ teacher/ flops/ time/ metrics (sums across ranks);
  evaluate_now       every eval.every steps and at both ends (rank 0);
  save               a checkpoint every save_every steps; `finish` writes the final model (with `lora`, the
                     adapter in final/lora and the merged model in final/).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch

from trainer import checkpoint as ckpt_mod
from trainer.config import TrainConfig
from trainer.distributed import setup_dist, weights_digest
from trainer.evaluate import evaluate
from trainer.flops import StepFlops, step_flops
from trainer.losses import Need, compute_loss, sampled_kl_estimate
from trainer.rollouts import MicroBatch, Minibatch, prepare_minibatch
from trainer.sampling import student_logprobs
from trainer.setup import Run, set_up
from trainer.summary import RunSummary, summarize
from trainer.teacher_io import to_teacher_batch

__all__ = ["RunSummary", "summarize", "train"]

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What a train step measured on this rank."""

    loss_sum: float = 0.0
    """Sum of the configured loss over the head positions."""
    tail_sum: float = 0.0
    """tail_weight x the sum of KL(student || reference) over the tail positions."""
    anchor_l2: float = 0.0
    """l2 x sum (theta - theta0)^2 at the step's weights."""
    kl_sum: float = 0.0
    """Sum of the Monte-Carlo per-token reverse KL estimates over the scored positions (on-policy only)."""
    kl_tokens: float = 0.0
    """Positions in kl_sum."""
    gap_max: float = 0.0
    """Largest |training-time log p_S(x) - sampling-time log p_S(x)| (0 up to numerics; on-policy only)."""
    wait_s: float = 0.0
    """Seconds spent waiting for the teacher's scores."""
    train_s: float = 0.0
    """Seconds spent in forward, backward and the optimizer step."""
    grad_norm: float = 0.0
    """Global gradient norm before clipping."""


def _train_micro_batch(run: Run, m: MicroBatch, *, sync: bool, n_tokens: float, res: StepResult) -> None:
    """Waits for one micro-batch's scores, then forward + backward on it (gradients accumulate): the configured
    loss on the head positions, the reference KL on the tail positions, both over the step's trained tokens."""
    tw = time.perf_counter()
    results = m.scores.result() if m.scores is not None else None
    res.wait_s += time.perf_counter() - tw
    tt = time.perf_counter()
    ro, dev = m.ro, run.device
    T = ro.ids_BT.shape[1]
    tb = None if results is None else to_teacher_batch(results, T, dev, run.need, run.vocab, ro.cand_ids_BTC)
    head_BT, ids_BT = m.head_BT.to(dev), ro.ids_BT.to(dev)  # (B, T) each
    with contextlib.nullcontext() if sync else run.ddp.no_sync():
        s_lp_BTV = student_logprobs(run.trained, ro, autocast_dtype=run.autocast)  # (B, T, V)
        loss = compute_loss(
            run.cfg.loss, s_lp_BTV, ids_BT, tb, head_BT, beta=run.cfg.jsd_beta, reduction="sum"
        )
        tail = run.anchor.tail_loss(s_lp_BTV, ro, m.tail_BT, run.autocast)
        ((loss if tail is None else loss + tail) / max(1.0, n_tokens)).backward()
    if run.source.on_policy:  # estimates that only hold for the student's own samples
        with torch.no_grad():
            s_tok_BT = s_lp_BTV.detach().gather(-1, ids_BT.unsqueeze(-1)).squeeze(-1)  # (B, T)
            if tb is not None:
                res.kl_sum += float(sampled_kl_estimate(s_tok_BT, tb.token_lp_BT, head_BT, "sum"))
                res.kl_tokens += float(head_BT.sum())
            gap = ((s_tok_BT.cpu() - ro.sample_lp_BT).abs() * ro.mask_BT).max()
            res.gap_max = max(res.gap_max, float(gap))
    res.loss_sum += float(loss.detach())
    res.tail_sum += 0.0 if tail is None else float(tail.detach())
    res.train_s += time.perf_counter() - tt


def train_step(run: Run, mb: Minibatch) -> StepResult:
    """Train on the scores: each micro-batch as its scores arrive, the L2 anchor's gradient, one optimizer step."""
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    res, n_tokens = StepResult(), mb.n_tokens
    for c, m in enumerate(mb.micro):
        sync = run.ddp is None or c == len(mb.micro) - 1  # DDP all-reduces on the last micro-batch only
        _train_micro_batch(run, m, sync=sync, n_tokens=n_tokens, res=res)
    tt = time.perf_counter()
    res.anchor_l2 = run.anchor.add_l2_grad()  # after the all-reduce: the same term on every rank
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip or float("inf"))
    for group in run.optimizer.param_groups:
        group["lr"] = mb.lr
    run.optimizer.step()
    res.train_s += time.perf_counter() - tt
    res.grad_norm = float(grad_norm)
    return res


def _step_sums(run: Run, mb: Minibatch, res: StepResult) -> dict[str, float]:
    """The step's counts of this rank summed over ranks, and the step's FLOPs added to the run's."""
    eos = run.eos
    lens = [n for m in mb.micro for n in m.ro.lengths]
    eos_hits = sum(
        int(eos is not None and m.ro.ids_BT[i, n - 1] == eos)
        for m in mb.micro
        for i, n in enumerate(m.ro.lengths)
    )
    counts = [m.tokens(sampled=run.source.kind != "gold", scored=run.need != Need.NONE) for m in mb.micro]
    sf = step_flops(
        [r for c in counts for r in c], student=run.s_dims, teacher=run.t_dims, sampler=run.source.dims
    )
    local = {
        "loss": res.loss_sum,
        "tail": res.tail_sum,
        "kl": res.kl_sum,
        "kl_tokens": res.kl_tokens,
        "tokens": mb.n_tokens,
        "rollouts": float(len(lens)),
        "tail_rollouts": float(mb.tail_rollouts),
        "eos_hits": float(eos_hits),
        "sampling": float(sf.sampling),
        "training": float(sf.training),
        "teacher": float(sf.teacher),
        "teacher_saved": float(sf.teacher_saved),
        "teacher_reused": float(sum(r.teacher_reused for c in counts for r in c)),
    }
    sums = dict(zip(local, run.dd.sum(list(local.values())), strict=True))
    sf = StepFlops(
        int(sums["sampling"]), int(sums["training"]), int(sums["teacher"]), int(sums["teacher_saved"])
    )
    run.cum = run.cum + sf
    return {**sums, "flops": sf}


def log_step(run: Run, done: int, mb: Minibatch, res: StepResult, t_step: float) -> None:
    """Sums the step's counts over ranks, adds its FLOPs to the run's, and logs the step's metrics (rank 0).

    The loss/ terms add up to the optimised objective: loss/<loss> and loss/anchor_tail are per trained token
    of the step, loss/anchor_l2 is added once."""
    cfg, s = run.cfg, _step_sums(run, mb, res)
    if not run.dd.main:
        return
    n, rollouts = max(1.0, s["tokens"]), s["rollouts"]
    metrics = {
        "progress/step": done,
        "progress/prefix_length": mb.L,
        "progress/lr": mb.lr,
        "progress/rollouts": rollouts,
        "progress/tail_rollouts": s["tail_rollouts"],
        "progress/completion_tokens": s["tokens"] / rollouts,
        "progress/eos_rate": s["eos_hits"] / rollouts,
        f"loss/{cfg.loss}": s["loss"] / n,
        "loss/grad_norm": res.grad_norm,
    }
    if run.source.on_policy:
        metrics["loss/sample_logprob_gap"] = res.gap_max
        if s["kl_tokens"]:
            metrics["loss/reverse_kl_mc"] = s["kl"] / s["kl_tokens"]
    if cfg.anchor.uses_reference:
        metrics["loss/anchor_tail"] = s["tail"] / n
    if cfg.anchor.l2:
        metrics["loss/anchor_l2"] = res.anchor_l2
    metrics.update(
        {
            **run.teacher.stats.take(),
            "teacher/wait_s": res.wait_s,
            "teacher/prompt_tokens_reused": s["teacher_reused"],
            **s["flops"].as_metrics("flops/"),
            **run.cum.as_metrics("flops/cum_"),
            "time/sample_s": mb.sample_s,
            "time/train_s": res.train_s,
            "time/step_s": time.perf_counter() - t_step,
            "time/elapsed_s": time.perf_counter() - run.t_start,
        }
    )
    run.writer.log(done, metrics)
    shown = (
        ("kl", metrics["loss/reverse_kl_mc"]) if "loss/reverse_kl_mc" in metrics else ("loss", s["loss"] / n)
    )
    run.progress.update(done, f"L={mb.L} {shown[0]}={shown[1]:.3f}")


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
            execution=ev.execution,
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
            "cumulative_flops": {
                "sampling": cum.sampling,
                "training": cum.training,
                "teacher": cum.teacher,
                "teacher_saved": cum.teacher_saved,
            },
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
        final = run.model
        if run.cfg.lora.rank:  # the adapter as trained, then the merged model any loader reads
            final.save_pretrained(out / "final" / "lora")
            final = final.merge_and_unload()
        final.save_pretrained(out / "final")
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
