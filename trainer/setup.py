"""Setting up a run: everything the training loop's stages share (`Run`), built once by `set_up`.

Order matters for reproducibility (a resumed run must draw what an uninterrupted one draws): the seeds are set
before the student is loaded, the RNG states of a checkpoint are restored after everything that could consume
randomness at set-up. Parameters are frozen (`freeze`) before the optimizer and the DDP wrapper are built, so
both see only the trained ones; the starting student of the anchors and a teacher copy that writes off-policy
rollouts are loaded from their own folders, never from a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from services.teacher.types import ModelInfo
from trainer import checkpoint as ckpt_mod
from trainer.anchor import Anchor, build_anchor, freeze
from trainer.config import TrainConfig
from trainer.distributed import Dist
from trainer.flops import ModelDims, StepFlops, dims_from_model
from trainer.losses import Need, loss_of
from trainer.metrics import MetricsWriter
from trainer.progress import Progress
from trainer.rollouts import RolloutSource, build_source
from trainer.sampling import pad_id_of
from trainer.tasks import Example, Task, load_task, render
from trainer.teacher_io import TeacherIO, check_teacher, teacher_dims

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A run in progress: its config, this rank, the models, the teacher, the data and the outputs."""

    cfg: TrainConfig
    dd: Dist
    device: torch.device
    out: Path
    t_start: float
    """perf_counter() when `train` began (time/elapsed_s)."""
    resumed_from: Path | None
    """The checkpoint resumed from, if any."""
    start: int
    """Steps already done (from the checkpoint) or 0."""
    cum: StepFlops
    """Cumulative FLOPs of all ranks so far."""
    tokenizer: object
    model: torch.nn.Module
    ddp: torch.nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    teacher: TeacherIO
    need: Need
    """What the loss needs from the teacher (the loss table's row of `cfg.loss`)."""
    job_id: str
    vocab: int
    eos: int | None
    pad: int
    autocast: torch.dtype | None
    data_rng: np.random.Generator
    """This rank's prompt order."""
    sampler: torch.Generator
    """This rank's sampling draws."""
    train_ids: list[list[int]]
    source: RolloutSource
    """Who writes the rollouts (config `rollouts`)."""
    anchor: Anchor
    """The L2 and tail anchors toward the starting student (config `anchor`)."""
    held_ex: list[Example]
    held_ids: list[list[int]]
    eval_full_rows: bool
    """Evaluate KL over full rows (else over the teacher's top eval_top_k and a tail)."""
    eval_top_k: int
    s_dims: ModelDims
    t_dims: ModelDims | None
    writer: MetricsWriter | None
    """Rank 0 only."""
    progress: Progress

    @property
    def trained(self) -> torch.nn.Module:
        """The module the forward passes of training go through (the DDP wrapper under torchrun)."""
        return self.ddp if self.ddp is not None else self.model


@dataclass
class Prompts:
    """The run's prompts, rendered; over-long ones skipped."""

    train_ex: list[Example]
    train_ids: list[list[int]]
    held_ex: list[Example]
    held_ids: list[list[int]]


def _load_prompts(cfg: TrainConfig, tokenizer, max_len: int) -> Prompts:
    """Training and held-out prompts (examples and token ids); over-long prompts are skipped."""

    def split(task: Task) -> Task:  # eval.split: its validation part instead of its held-out prompts
        return task.validation() if cfg.eval.split == "validation" else task

    task = split(load_task(cfg.prompts))
    if isinstance(cfg.eval.prompts, int):
        heldout = task.heldout[: cfg.eval.prompts]
    else:
        heldout = split(load_task(cfg.eval.prompts)).heldout
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

    train_ex, train_ids = keep(task.train, cfg.max_new_tokens)
    if not train_ids:
        raise ValueError(
            f"no training prompt of {cfg.prompts!r} fits max_prompt_tokens={cfg.max_prompt_tokens}."
        )
    return Prompts(train_ex, train_ids, *keep(heldout, cfg.eval.max_new_tokens))


def _eval_kl_mode(cfg: TrainConfig, info: ModelInfo, vocab: int, dd: Dist) -> tuple[bool, int]:
    """(full rows?, top-k) of the evaluation KL against this teacher: full rows when asked and possible, and
    `eval.top_k` capped by the teacher's max_top_k and the vocabulary."""
    full_rows = (
        cfg.eval.full_rows
        and info.supports_full
        and info.vocab_size == vocab
        and (cfg.eval.max_new_tokens * info.vocab_size <= info.max_full_elements)
    )
    top_k = min(cfg.eval.top_k, info.max_top_k, vocab)
    if cfg.eval.full_rows and not full_rows and dd.main:
        log.warning("eval KL falls back to the teacher's top-%d with a tail bucket (a lower bound)", top_k)
    return full_rows, top_k


def _resume(cfg: TrainConfig, dd: Dist, resume: bool) -> tuple[Path, Path | None]:
    """(output folder, created; the checkpoint to resume from or None)."""
    out = Path(cfg.output_dir)
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
    dd.barrier()
    ckpt = ckpt_mod.latest_checkpoint(out) if resume else None
    if resume and ckpt is None and dd.main:
        log.warning("--resume: no checkpoint under %s; starting from step 0", out)
    return out, ckpt


def _student(cfg: TrainConfig, ckpt: Path | None, device: torch.device):
    """(tokenizer, model) of the student: its weights from the checkpoint when resuming; with `lora`, the
    starting student wrapped in peft's LoRA (its adapters from the checkpoint when resuming)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    if not cfg.lora.rank:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt) if ckpt else cfg.student, dtype=torch.float32)
        return tokenizer, model.to(device)
    from peft import LoraConfig, PeftModel, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32)
    if ckpt is not None:
        return tokenizer, PeftModel.from_pretrained(base, str(ckpt), is_trainable=True).to(device)
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        target_modules=list(cfg.lora.target_modules),
        lora_dropout=cfg.lora.dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return tokenizer, get_peft_model(base, lora).to(device)


def _optimizer(cfg: TrainConfig, params, ckpt: Path | None, dd: Dist, data_rng, sampler):
    """(AdamW over the trained `params`, steps done, cumulative FLOPs): fresh, or restored from the checkpoint
    with this rank's RNGs."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ckpt is None:
        return optimizer, 0, StepFlops()
    state, rng = ckpt_mod.load_state(ckpt, dd.rank, dd.world)
    optimizer.load_state_dict(state["optimizer"])
    ckpt_mod.restore_rng(rng, data_rng, sampler)
    return optimizer, state["step"], StepFlops(**state["cumulative_flops"])


def set_up(
    cfg: TrainConfig,
    dd: Dist,
    device: torch.device,
    *,
    resume: bool,
    t_start: float,
    closing: contextlib.ExitStack,
) -> Run:
    """Everything a run needs, resumed from the newest checkpoint when `resume`; what must be closed at the end
    (teacher connection, metrics files, progress bar) is registered on `closing`."""
    out, ckpt = _resume(cfg, dd, resume)
    torch.manual_seed(cfg.seed)
    data_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, dd.rank]))
    sampler = torch.Generator().manual_seed(cfg.seed * 1_000_003 + dd.rank)
    tokenizer, model = _student(cfg, ckpt, device)
    vocab = model.get_output_embeddings().weight.shape[0]
    need = loss_of(cfg.loss).need
    trained = freeze(model, cfg.freeze)

    teacher = TeacherIO(cfg.teacher, cfg.teacher_client, device=str(device))
    closing.callback(teacher.close)
    info = teacher.model_info()
    check_teacher(
        info, tokenizer, vocab, student=cfg.student, need=need, top_k=cfg.top_k, candidates=cfg.candidates
    )
    prompts = _load_prompts(cfg, tokenizer, info.max_context)
    eval_full_rows, eval_top_k = _eval_kl_mode(cfg, info, vocab, dd)
    source = build_source(cfg, info, tokenizer, model, prompts.train_ex, vocab, device)
    anchor = build_anchor(cfg, trained, device)

    optimizer, start, cum = _optimizer(cfg, [p for _, p in trained], ckpt, dd, data_rng, sampler)
    ddp = None
    if dd.on:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    writer = None
    if dd.main:
        writer = MetricsWriter(out, tensorboard=cfg.tensorboard, resume_step=start if ckpt else None)
        closing.callback(writer.close)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    progress = Progress(cfg.progress_bar and dd.main, cfg.steps, start)
    closing.callback(progress.close)
    return Run(
        cfg=cfg, dd=dd, device=device, out=out, t_start=t_start, resumed_from=ckpt, start=start, cum=cum,
        tokenizer=tokenizer, model=model, ddp=ddp, optimizer=optimizer, teacher=teacher, need=need,
        job_id=cfg.run_job_id, vocab=vocab, eos=tokenizer.eos_token_id, pad=pad_id_of(tokenizer),
        autocast=torch.bfloat16 if cfg.dtype == "bfloat16" else None, data_rng=data_rng, sampler=sampler,
        train_ids=prompts.train_ids, source=source, anchor=anchor, held_ex=prompts.held_ex,
        held_ids=prompts.held_ids, eval_full_rows=eval_full_rows,
        eval_top_k=eval_top_k, s_dims=dims_from_model(model), t_dims=teacher_dims(info), writer=writer,
        progress=progress,
    )  # fmt: skip
