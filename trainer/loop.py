"""The training loop: `train(cfg) -> RunSummary`, on one process or as one rank of `torchrun` (DDP).

One step, per rank:
  1. L = prefix_length(step); draw `batch_size` prompts (this rank's data RNG), `samples_per_prompt` rollouts each;
  2. sample the rollouts micro-batch by micro-batch; each micro-batch's requests go to the teacher as soon as it is
     sampled, and the next one is sampled while the teacher scores it (the weights do not change within a step,
     so every rollout is strictly on-policy);
  3. as the teacher's scores arrive, forward + backward each micro-batch (gradients accumulate; DDP averages
     them across ranks on the last one), loss normalised by the step's number of trained tokens;
  4. clip, set the learning rate, AdamW step; log progress/ loss/ teacher/ flops/ time/ metrics (sums across
     ranks), evaluate every eval.every steps (rank 0), checkpoint every save_every steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from trainer import checkpoint as ckpt_mod
from trainer.config import TrainConfig
from trainer.evaluate import EvalResult, evaluate
from trainer.flops import StepFlops, dims_from_model, step_flops
from trainer.losses import compute_loss, needs, sampled_kl_estimate
from trainer.metrics import MetricsWriter, read_metrics, read_samples
from trainer.sampling import generate, student_logprobs
from trainer.schedule import learning_rate, prefix_length
from trainer.tasks import Example, load_task, render
from trainer.teacher_io import TeacherIO, build_requests, check_teacher, teacher_dims, to_teacher_batch

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a run achieved: the figures a demo prints and a benchmark tabulates."""

    output_dir: str
    final_dir: str
    steps: int
    before: dict[str, float] = field(default_factory=dict)
    """eval/* before the first step (empty without eval.at_start)."""
    after: dict[str, float] = field(default_factory=dict)
    """eval/* after the last step."""
    samples_before: list[dict] = field(default_factory=list)
    samples_after: list[dict] = field(default_factory=list)
    flops: dict[str, float] = field(default_factory=dict)
    """Cumulative training FLOPs (flops/cum_sampling, cum_training, cum_teacher, cum_total), all ranks."""
    wall_s: float = 0.0
    metrics_path: str = ""


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


def _setup_dist(cfg: TrainConfig) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise ValueError(f"`device` is {cfg.device!r} but no CUDA device is available; use device=cpu.")
    else:  # under torchrun each rank takes its LOCAL_RANK-th GPU unless one is named
        device = torch.device(cfg.device if ":" in cfg.device else f"cuda:{local}")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    d = _Dist(dist.get_rank() if world > 1 else 0, world, local)
    return d, device


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _Progress:
    """A rich progress bar on a terminal, a plain line every ~5% of the run otherwise (rank 0 only)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled, self.total, self.bar = enabled, total, None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        if self.console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step == self.total or step % max(1, self.total // 20) == 0:
            self.console.print(f"step {step}/{self.total} {info}", highlight=False)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _load_prompts(
    cfg: TrainConfig, tokenizer, max_len: int
) -> tuple[list[list[int]], list[Example], list[list[int]]]:
    """(training prompt ids, held-out examples, held-out prompt ids); over-long prompts are skipped."""
    task = load_task(cfg.prompts)
    if isinstance(cfg.eval.prompts, int):
        heldout = task.heldout[: cfg.eval.prompts]
    else:
        heldout = load_task(cfg.eval.prompts).heldout
        heldout = heldout[: cfg.eval.limit] if cfg.eval.limit else heldout

    def keep(examples, room):
        out_ex, out_ids = [], []
        for ex in examples:
            ids = render(ex, tokenizer, cfg.prompt_format)
            if len(ids) <= min(cfg.max_prompt_tokens, max_len - room):
                out_ex.append(ex)
                out_ids.append(ids)
        if len(out_ex) < len(examples):
            log.warning(
                "skipped %d of %d prompts longer than the limit", len(examples) - len(out_ex), len(examples)
            )
        return out_ex, out_ids

    _, train_ids = keep(task.train, cfg.max_new_tokens)
    if not train_ids:
        raise ValueError(
            f"no training prompt of {cfg.prompts!r} fits max_prompt_tokens={cfg.max_prompt_tokens}."
        )
    held_ex, held_ids = keep(heldout, cfg.eval.max_new_tokens)
    return train_ids, held_ex, held_ids


def train(cfg: TrainConfig, *, resume: bool = False) -> RunSummary:
    """Runs the distillation described by `cfg`; with `resume`, continues from the newest checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    dd, device = _setup_dist(cfg)
    out = Path(cfg.output_dir)
    if dd.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dd.barrier()
    ckpt = ckpt_mod.latest_checkpoint(out) if resume else None
    if resume and ckpt is None and dd.rank == 0:
        log.warning("--resume: no checkpoint under %s; starting from step 0", out)

    torch.manual_seed(cfg.seed)
    data_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, dd.rank]))
    sampler = torch.Generator().manual_seed(cfg.seed * 1_000_003 + dd.rank)
    autocast = torch.bfloat16 if cfg.dtype == "bfloat16" else None

    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt) if ckpt else cfg.student, dtype=torch.float32).to(
        device
    )
    vocab = model.get_output_embeddings().weight.shape[0]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    need = needs(cfg.loss)
    job_id = cfg.run_job_id

    teacher = TeacherIO(
        cfg.teacher,
        max_in_flight=cfg.teacher_max_in_flight,
        timeout_s=cfg.teacher_timeout_s,
        retries=cfg.teacher_retries,
        token=cfg.resolved_teacher_token,
        device=str(device),
    )
    writer = None
    progress = None
    try:
        info = teacher.model_info()
        check_teacher(info, tokenizer, vocab, student=cfg.student, need=need, top_k=cfg.top_k)
        s_dims, t_dims = dims_from_model(model), teacher_dims(info)
        train_ids, held_ex, held_ids = _load_prompts(cfg, tokenizer, info.max_context)
        full_eval = (
            cfg.eval.full_rows
            and info.supports_full
            and info.vocab_size == vocab
            and (cfg.eval.max_new_tokens * info.vocab_size <= info.max_full_elements)
        )
        if cfg.eval.full_rows and not full_eval and dd.rank == 0:
            log.warning(
                "eval KL falls back to the teacher's top-%d with a tail bucket (a lower bound)",
                min(64, info.max_top_k),
            )

        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        start, cum = 0, StepFlops()
        if ckpt is not None:
            state, rng = ckpt_mod.load_state(ckpt, dd.rank, dd.world)
            optimizer.load_state_dict(state["optimizer"])
            ckpt_mod.restore_rng(rng, data_rng, sampler)
            start, cum = state["step"], StepFlops(**state["cumulative_flops"])
        ddp = None
        if dd.on:
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        trained = ddp if ddp is not None else model

        if dd.rank == 0:
            writer = MetricsWriter(out, tensorboard=cfg.tensorboard, resume_step=start if ckpt else None)
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        progress = _Progress(cfg.progress_bar and dd.rank == 0, cfg.steps, start)

        def run_eval(step: int) -> EvalResult | None:
            result = None
            if dd.rank == 0 and held_ids:
                progress.note(f"evaluating at step {step} on {len(held_ids)} held-out prompts ...")
                result = evaluate(
                    model,
                    tokenizer,
                    held_ex,
                    held_ids,
                    teacher,
                    max_new_tokens=cfg.eval.max_new_tokens,
                    batch_size=cfg.eval.batch_size,
                    head_tokens=cfg.eval.head_tokens,
                    full_rows=full_eval,
                    vocab=vocab,
                    job_id=job_id,
                    teacher_temperature=cfg.teacher_temperature,
                    max_top_k=min(64, info.max_top_k, vocab),
                    n_samples=cfg.eval.samples,
                    autocast_dtype=autocast,
                )
                writer.log(step, {"progress/step": step, **result.metrics, **cum.as_metrics("flops/cum_")})
                teacher.stats.take()  # eval traffic is not training traffic
                writer.log_samples(step, result.samples)
                progress.note(
                    "  "
                    + "  ".join(
                        f"{k[5:]}={v:.4g}"
                        for k, v in result.metrics.items()
                        if k in ("eval/accuracy", "eval/kl_head", "eval/kl_tail")
                    )
                )
            dd.barrier()
            return result

        if start == 0 and cfg.eval.at_start:
            run_eval(0)

        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            L = prefix_length(cfg.prefix, step, cfg.steps, cfg.max_new_tokens)
            lr = learning_rate(
                step, cfg.steps, peak=cfg.lr, warmup_steps=cfg.warmup_steps, kind=cfg.lr_schedule
            )
            idx = data_rng.choice(
                len(train_ids), size=cfg.batch_size, replace=len(train_ids) < cfg.batch_size
            )
            prompts = [train_ids[i] for i in idx for _ in range(cfg.samples_per_prompt)]

            # 1-2. sample micro-batches, each sent to the teacher as soon as it exists
            pending, t_sample = [], 0.0
            for c, s in enumerate(range(0, len(prompts), cfg.micro_batch_size)):
                ts = time.perf_counter()
                ro = generate(
                    model,
                    prompts[s : s + cfg.micro_batch_size],
                    L,
                    eos_id=eos if cfg.stop_at_eos else None,
                    pad_id=pad,
                    temperature=cfg.temperature,
                    generator=sampler,
                    autocast_dtype=autocast,
                )
                t_sample += time.perf_counter() - ts
                reqs = build_requests(
                    ro,
                    need=need,
                    job_id=job_id,
                    id_prefix=f"{job_id}:r{dd.rank}:s{step}:c{c}",
                    top_k=cfg.top_k,
                    temperature=cfg.teacher_temperature,
                )
                pending.append((ro, teacher.submit(reqs)))
            n_tokens = sum(float(ro.mask_BT.sum()) for ro, _ in pending)

            # 3. train on each micro-batch as its scores arrive
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = kl_sum = gap_max = 0.0
            t_wait = t_train = 0.0
            for c, (ro, fut) in enumerate(pending):
                tw = time.perf_counter()
                results = fut.result()
                t_wait += time.perf_counter() - tw
                tt = time.perf_counter()
                tb = to_teacher_batch(results, ro.ids_BT.shape[1], device, need, vocab)
                mask = ro.mask_BT.to(device)
                ids = ro.ids_BT.to(device)
                sync = ddp is None or c == len(pending) - 1
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    s_lp = student_logprobs(trained, ro, autocast_dtype=autocast)
                    loss = compute_loss(cfg.loss, s_lp, ids, tb, mask, beta=cfg.jsd_beta, reduction="sum")
                    (loss / max(1.0, n_tokens)).backward()
                with torch.no_grad():
                    s_tok = s_lp.detach().gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                    kl_sum += float(sampled_kl_estimate(s_tok, tb.token_lp_BT, mask, "sum"))
                    gap = ((s_tok.cpu() - ro.sample_lp_BT).abs() * ro.mask_BT).max()
                    gap_max = max(gap_max, float(gap))
                loss_sum += float(loss.detach())
                t_train += time.perf_counter() - tt

            # 4. optimizer step
            tt = time.perf_counter()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            t_train += time.perf_counter() - tt

            lens = [n for ro, _ in pending for n in ro.lengths]
            plens = [len(p) for p in prompts]
            eos_hits = sum(
                int(eos is not None and ro.ids_BT[i, n - 1] == eos)
                for ro, _ in pending
                for i, n in enumerate(ro.lengths)
            )
            sf = step_flops(s_dims, t_dims, plens, lens)
            tot = dd.sum(
                [
                    loss_sum,
                    kl_sum,
                    n_tokens,
                    float(len(lens)),
                    float(eos_hits),
                    float(sf.sampling),
                    float(sf.training),
                    float(sf.teacher),
                ]
            )
            sf = StepFlops(int(tot[5]), int(tot[6]), int(tot[7]))
            cum = cum + sf
            done = step + 1
            if dd.rank == 0:
                metrics = {
                    "progress/step": done,
                    "progress/prefix_length": L,
                    "progress/lr": lr,
                    "progress/rollouts": tot[3],
                    "progress/completion_tokens": tot[2] / tot[3],
                    "progress/eos_rate": tot[4] / tot[3],
                    f"loss/{cfg.loss}": tot[0] / max(1.0, tot[2]),
                    "loss/reverse_kl_mc": tot[1] / max(1.0, tot[2]),
                    "loss/grad_norm": float(grad_norm),
                    "loss/sample_logprob_gap": gap_max,
                    **teacher.stats.take(),
                    "teacher/wait_s": t_wait,
                    **sf.as_metrics("flops/"),
                    **cum.as_metrics("flops/cum_"),
                    "time/sample_s": t_sample,
                    "time/train_s": t_train,
                    "time/step_s": time.perf_counter() - t0,
                    "time/elapsed_s": time.perf_counter() - t_start,
                }
                writer.log(done, metrics)
                progress.update(done, f"L={L} kl={metrics['loss/reverse_kl_mc']:.3f}")
            if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.steps:
                run_eval(done)
            if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
                ckpt_mod.save_checkpoint(
                    out,
                    done,
                    model=model,
                    tokenizer=tokenizer,
                    optimizer=optimizer,
                    extra={
                        "cumulative_flops": {
                            "sampling": cum.sampling,
                            "training": cum.training,
                            "teacher": cum.teacher,
                        },
                        "config": cfg.to_dict(),
                    },
                    rng=ckpt_mod.rng_state(data_rng, sampler),
                    rank=dd.rank,
                    world_size=dd.world,
                    barrier=dd.barrier,
                    keep=cfg.keep_checkpoints,
                )

        finished_before = ckpt is not None and start >= cfg.steps and (out / "final").exists()
        if not finished_before:  # resuming a finished run only re-reads its summary
            run_eval(cfg.steps)
        if dd.on:
            (out / f"weights_digest.rank{dd.rank}.txt").write_text(_weights_digest(model) + "\n")
        if dd.rank == 0:
            model.save_pretrained(out / "final")
            tokenizer.save_pretrained(out / "final")
        dd.barrier()
    finally:
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        teacher.close()
    summary = summarize(out)
    summary.wall_s = time.perf_counter() - t_start
    if dd.on:
        dist.destroy_process_group()
    return summary


def summarize(run_dir: str | Path) -> RunSummary:
    """RunSummary of a finished run, read back from its metrics.jsonl and samples.jsonl."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    steps = [r for r in rows if "progress/prefix_length" in r]

    def eval_keys(r):
        return {k: v for k, v in r.items() if k.startswith("eval/")}

    samples = read_samples(run_dir)
    last = steps[-1] if steps else {}
    return RunSummary(
        output_dir=str(run_dir),
        final_dir=str(run_dir / "final"),
        steps=int(last.get("progress/step", 0)),
        before=eval_keys(evals[0]) if evals and evals[0]["step"] == 0 else {},
        after=eval_keys(evals[-1]) if evals and evals[-1]["step"] > 0 else {},
        samples_before=samples[0]["samples"] if samples and samples[0]["step"] == 0 else [],
        samples_after=samples[-1]["samples"] if samples and samples[-1]["step"] > 0 else [],
        flops={k: v for k, v in last.items() if k.startswith("flops/cum_")},
        metrics_path=str(run_dir / "metrics.jsonl"),
    )
