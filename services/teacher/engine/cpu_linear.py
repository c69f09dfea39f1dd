"""Linear layers on oneDNN with pre-packed weights, for CPU engines.

torch's CPU wheels run float32 `nn.Linear` on MKL. On an AMD EPYC with AVX-512 (2 cores), a SmolLM2-sized
projection (2048 x 576 @ 576 x 1536) ran at ~200 GFLOPS on MKL against ~450 on oneDNN with the weight packed once
into oneDNN's blocked layout (torch's own `mkldnn._linear_pointwise` op). In bfloat16 the two were within 1.05x
on the probe below, so bfloat16 engines there keep torch.

The two kernels sum in different orders: float32 results differ at rounding level (relative ~1e-6), bfloat16
results were identical in our measurements. `choose` times both on a fixed projection once per process and
dtype, and keeps oneDNN only where it is clearly faster, so a CPU where MKL wins (or a torch without oneDNN) keeps
plain torch.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

# Rows of the activation the weight layout is packed for (a hint: any row count runs).
PACK_ROWS_HINT = 1024
# oneDNN is kept when it is at least this much faster than torch on the probe.
MIN_SPEEDUP = 1.15
CHOICES = ("auto", "torch", "onednn")


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`nn.Linear` inference on oneDNN with the weight packed once (no autograd)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x_ND, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn packed"


def pack_linears(module: nn.Module) -> int:
    """Replaces every `nn.Linear` under `module` by a `PackedLinear`, in place; returns how many it replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
            n += 1
        else:
            n += pack_linears(child)
    return n


def _seconds(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
@torch.inference_mode()
def onednn_speedup(dtype: torch.dtype, rows: int = 512, width: int = 1024) -> float:
    """How much faster oneDNN runs a (rows x width) @ (width x width) projection in `dtype` than torch does on
    this CPU (0 where oneDNN is missing). The shape is fixed, not the model's, so every engine of a process (and,
    away from the threshold, of a machine) makes the same choice; measured once per process and dtype."""
    if not available():
        return 0.0
    torch.manual_seed(0)
    linear = nn.Linear(width, width, bias=False).to(dtype)
    x = torch.randn(rows, width, dtype=dtype)
    packed = PackedLinear(linear)
    return _seconds(lambda: linear(x)) / _seconds(lambda: packed(x))


def choose(setting: str, device: torch.device, dtype: torch.dtype) -> str:
    """The linear kernels an engine of weights `dtype` runs: `torch` or `onednn` (for `auto`: oneDNN on a CPU
    where the probe finds it at least MIN_SPEEDUP faster)."""
    if setting not in CHOICES:
        raise ValueError(f"`cpu_linear` must be one of {list(CHOICES)}, got {setting!r}.")
    if device.type != "cpu" or setting == "torch":
        return "torch"
    if setting == "onednn":
        if not available():
            raise ValueError("`cpu_linear` is 'onednn' but this torch build has no oneDNN linear kernel.")
        return "onednn"
    return "onednn" if onednn_speedup(dtype) >= MIN_SPEEDUP else "torch"
