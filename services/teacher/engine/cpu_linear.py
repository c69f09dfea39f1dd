"""Linear layers on oneDNN with pre-packed weights, for CPU engines.

torch's CPU wheels run float32 `nn.Linear` on MKL. On an AMD EPYC with AVX-512 (2 cores), a SmolLM2-sized
projection (2048 x 576 @ 576 x 1536) ran at ~200 GFLOPS on MKL against ~450 on oneDNN with the weight packed once
into oneDNN's blocked layout (torch's own `mkldnn._linear_pointwise` op): the float32 SmolLM2 engine went from
~450 to ~800 positions/s. The two kernels sum in different orders, so float32 results differ at rounding level
(max 4.6e-5 nats on SmolLM2); `choose` times both on the layer's shape once per process and keeps oneDNN only where
it is clearly faster, so a CPU where MKL wins (or a torch without oneDNN) keeps plain torch.

bfloat16 linears already run on oneDNN, reordering the weight on every call; packing it once gave the
same numbers bit for bit (SmolLM2's token logprobs, max difference 0) and ~1.15x the bfloat16 engine (its LM head
above all), so `auto` packs them wherever oneDNN has a bfloat16 kernel (AVX-512 or AVX-NE-CONVERT: not on an
AVX2-only CPU, where bfloat16 stays on torch). float16 is probed like float32.

A float32 LM head over a bfloat16 trunk (`lm_head_dtype: float32`) multiplies bfloat16 values: the trunk's
hidden states and the model's bfloat16 weights, upcast. Their products are exact in float32, so oneDNN's
bfloat16 units (AMX, AVX512-BF16), which multiply bfloat16 and accumulate in float32, compute the same head up to
summation order: `BfloatValuedLinear` runs it so (3.3x faster than float32 on 2 AMX Xeon cores, 1.3e-6 from a
float64 product against 2.1e-6 for float32's own kernel).
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


def packs_bfloat16() -> bool:
    """Whether this CPU has oneDNN's bfloat16 kernels (packing a bfloat16 weight raises without them)."""
    return available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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


class BfloatValuedLinear(nn.Module):
    """A float32 `nn.Linear` whose weights hold bfloat16 values, for inputs that do too, run on oneDNN's
    bfloat16 units (`torch.backends.mkldnn.matmul.fp32_precision = "bf16"` around the call: rounding a bfloat16
    value to bfloat16 changes nothing, and the products accumulate in float32). Not thread-safe: the flag is
    the process's; an engine scores from one thread."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        if w.dtype != torch.float32 or not torch.equal(w, w.bfloat16().float()):
            raise ValueError("BfloatValuedLinear needs float32 weights that hold bfloat16 values")
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        matmul = torch.backends.mkldnn.matmul
        before = matmul.fp32_precision
        matmul.fp32_precision = "bf16"
        try:
            return self.linear(x_ND)
        finally:
            matmul.fp32_precision = before


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


def seconds(fn, repeats: int = 5) -> float:
    """The best of `repeats` timings of `fn()`, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
@torch.inference_mode()
def onednn_speedup(dtype: torch.dtype, in_features: int, out_features: int, rows: int = 256) -> float:
    """How much faster oneDNN runs a (rows x in) @ (in x out) projection in `dtype` than torch does on this CPU
    (0 where oneDNN is missing). Measured once per process and shape, so every engine of a process makes the
    same choice for the same layer."""
    if not available():
        return 0.0
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False).to(dtype)
    x = torch.randn(rows, in_features, dtype=dtype)
    try:
        packed = PackedLinear(linear)
        return seconds(lambda: linear(x)) / seconds(lambda: packed(x))
    except RuntimeError:  # no oneDNN kernel for this dtype on this CPU
        return 0.0


def largest_linear(module: nn.Module) -> nn.Linear | None:
    """The `nn.Linear` under `module` with the most weights (the trunk's probe shape)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return max(linears, key=lambda m: m.weight.numel(), default=None)


def choose(setting: str, device: torch.device, linear: nn.Module | None) -> str:
    """The kernels for `linear` (a layer standing for its kind: the trunk's largest projection, or the LM head):
    `torch` or `onednn`. For `auto` on a CPU with oneDNN: oneDNN in bfloat16; in float32 and float16 where the
    probe of that layer's shape finds it at least MIN_SPEEDUP faster; torch where oneDNN has no kernel for the
    dtype on this CPU."""
    if setting not in CHOICES:
        raise ValueError(f"`cpu_linear` must be one of {list(CHOICES)}, got {setting!r}.")
    if device.type != "cpu" or setting == "torch" or not isinstance(linear, nn.Linear):
        return "torch"
    if not available():
        if setting == "onednn":
            raise ValueError("`cpu_linear` is 'onednn' but this torch build has no oneDNN linear kernel.")
        return "torch"
    w = linear.weight
    if w.dtype == torch.bfloat16 and not packs_bfloat16():
        if setting == "onednn":
            raise ValueError(
                "`cpu_linear` is 'onednn' but this CPU has no oneDNN bfloat16 kernel (needs AVX-512)."
            )
        return "torch"
    if setting == "onednn" or w.dtype == torch.bfloat16:  # bfloat16: oneDNN either way, reordered once here
        return "onednn"
    return "onednn" if onednn_speedup(w.dtype, w.shape[1], w.shape[0]) >= MIN_SPEEDUP else "torch"
