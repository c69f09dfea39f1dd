"""The run's place in a `torchrun` job: this rank, the world size, its device, and the few collectives the loop uses.

Without torchrun (WORLD_SIZE unset) it is a world of one and every collective is a no-op, so the loop has one code
path. Under torchrun each rank takes its LOCAL_RANK-th GPU (unless `device` names one) and joins the process group
(nccl on CUDA, gloo on CPU).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's rank in a world of `world` ranks (1: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, evaluates and writes the final model."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks (collective: every rank calls it)."""
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.on:
            dist.destroy_process_group()


def setup_dist(device_name: str) -> tuple[Dist, torch.device]:
    """This rank and its device (`device_name`: auto | cpu | cuda | cuda:N); joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available()):
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise ValueError(f"`device` is {device_name!r} but no CUDA device is available; use device=cpu.")
    else:  # under torchrun each rank takes its LOCAL_RANK-th GPU unless one is named
        device = torch.device(device_name if ":" in device_name else f"cuda:{local}")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank() if world > 1 else 0, world, local), device


def weights_digest(model) -> str:
    """sha256 over the model's tensors (sorted names, float32 bytes): equal on every rank after a DDP run."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
