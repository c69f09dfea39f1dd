"""Checkpoints: the student as safetensors (`save_pretrained`) plus optimizer, schedule position and RNG states.

Layout of `output_dir/checkpoints/step-000040/`:
    model.safetensors, config.json, tokenizer files     the student after 40 completed steps
    trainer_state.pt                                     step, optimizer state, cumulative counters, config
    rng_rank{r}.pt                                       every rank's RNG states (data order, sampling, torch)
A checkpoint is written to a temporary folder and renamed when complete, so a crash never leaves a half
checkpoint that `--resume` would pick up. The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

STATE = "trainer_state.pt"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return None
    done = sorted(
        p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE).exists()
    )
    return done[-1] if done else None


def rng_state(data_rng: np.random.Generator, sampler: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy_global": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "data": data_rng.bit_generator.state,
        "sampler": sampler.get_state(),
    }


def restore_rng(state: dict, data_rng: np.random.Generator, sampler: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy_global"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    data_rng.bit_generator.state = state["data"]
    sampler.set_state(state["sampler"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model,
    tokenizer,
    optimizer,
    extra: dict,
    rng: dict,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    keep: int = 2,
) -> Path:
    """Writes the checkpoint of `step` completed steps (collective: every rank calls it)."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(
            {"step": step, "world_size": world_size, "optimizer": optimizer.state_dict(), **extra},
            tmp / STATE,
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        old = sorted(p for p in final.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def load_state(ckpt: Path, rank: int, world_size: int) -> tuple[dict, dict]:
    """(trainer state, this rank's RNG state) of a checkpoint; the world size must match."""
    # Our own files, written by save_checkpoint (RNG states hold numpy/python objects, hence weights_only=False).
    state = torch.load(ckpt / STATE, map_location="cpu", weights_only=False)
    if state["world_size"] != world_size:
        raise ValueError(
            f"checkpoint {ckpt} was written by {state['world_size']} ranks; resume it with the same "
            f"number of ranks (got {world_size})."
        )
    rng = torch.load(ckpt / f"rng_rank{rank}.pt", map_location="cpu", weights_only=False)
    return state, rng
