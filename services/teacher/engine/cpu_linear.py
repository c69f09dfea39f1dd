"""Linear layers on oneDNN with pre-packed weights, for CPU engines.

torch's CPU wheels run float32 `nn.Linear` on MKL. On an AMD EPYC with AVX-512 (2 cores), a SmolLM2-sized
projection (2048 x 576 @ 576 x 1536) ran at ~200 GFLOPS on MKL against ~450 on oneDNN with the weight packed once
into oneDNN's blocked layout (torch's own `mkldnn._linear_pointwise` op): the float32 SmolLM2 engine went from
~450 to ~800 positions/s. The two kernels sum in different orders, so float32 results differ at rounding level
(max 4.6e-5 nats on SmolLM2); `choose` times both on the model's mix of projection shapes once per process and
keeps oneDNN where it is faster, so a CPU where MKL wins (or a torch without oneDNN) keeps plain torch. On 2 Zen 4
EPYC cores (AVX-512 on 256-bit units, ~140-210 GFLOPS) oneDNN ran the float32 engine 1.2-1.3x faster than MKL.

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
# oneDNN is kept when the probe finds it at least this much faster than torch. Its float32 sums differ from MKL's
# at rounding level only, and the engine's LM head ran on oneDNN on every CPU measured, so the margin guards only
# against flipping between two equal kernels: 1.15 (an earlier value) sat inside the probe's noise on 2 Zen 4
# EPYC cores, where oneDNN ran the float32 trunk 1.2x faster and a 256-row probe of one shape read 1.03-1.32x.
MIN_SPEEDUP = 1.05
# A probe times each projection shape on about this many FLOPs (`probe_rows`), in this many interleaved rounds.
PROBE_FLOPS = 8e9
PROBE_ROUNDS = 7
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


def linear_shapes(module: nn.Module) -> dict[tuple[int, int], int]:
    """(in_features, out_features) of every `nn.Linear` under `module` (itself included; the layers
    `pack_linears` would replace), with how many layers have that shape: the projections a forward pass runs."""
    shapes: dict[tuple[int, int], int] = {}
    for m in module.modules():
        if isinstance(m, nn.Linear):
            shapes[(m.in_features, m.out_features)] = shapes.get((m.in_features, m.out_features), 0) + 1
    return shapes


def probe_rows(shapes: dict[tuple[int, int], int]) -> int:
    """Activation rows for a probe: a power of two in [64, 1024], about PROBE_FLOPS for one layer of each shape
    (1,024 rows for a SmolLM2 block, as in a real batch; 128 for its LM head, a real logit chunk's rows)."""
    flops_per_row = sum(2 * i * o for i, o in shapes)
    return 1 << max(6, min(10, int(PROBE_FLOPS / max(flops_per_row, 1)).bit_length() - 1))


@functools.cache
@torch.inference_mode()
def onednn_speedup(dtype: torch.dtype, shapes: tuple[tuple[int, int, int], ...]) -> float:
    """How much faster oneDNN runs the projections `shapes` ((in, out, count) each, a model's mix) in `dtype`
    than torch does on this CPU (0 where oneDNN has no kernel for the dtype), by `speedup`. Measured once per
    process, dtype and mix, so every engine of a process makes the same choice."""
    if not available():
        return 0.0
    torch.manual_seed(0)
    counts = {(i, o): n for i, o, n in shapes}
    rows = probe_rows(counts)
    plain = {s: nn.Linear(*s, bias=False).to(dtype) for s in counts}
    xs = {i: torch.randn(rows, i, dtype=dtype) for i, _ in counts}
    try:
        packed = {s: PackedLinear(lin) for s, lin in plain.items()}
    except RuntimeError:  # no oneDNN kernel for this dtype on this CPU
        return 0.0

    least = min(counts.values())
    calls = [(s, min(4, round(n / least))) for s, n in counts.items()]  # the mix, in small whole numbers

    def run(layers) -> None:
        for s, n in calls:
            for _ in range(n):
                layers[s](xs[s[0]])

    return speedup(lambda: run(plain), lambda: run(packed))


def speedup(baseline, candidate, rounds: int | None = None) -> float:
    """How much faster `candidate()` runs than `baseline()`: the ratio of their best times over `rounds`
    (PROBE_ROUNDS) interleaved timings, after one warm-up call of each. On a shared 2-core machine the best time
    is the least disturbed one; interleaving gives a noisy stretch to both sides (medians swung more: 0.88-1.14x
    for blocked attention in bfloat16, where the best times read 1.18-1.40x)."""
    baseline(), candidate()
    best = [float("inf"), float("inf")]
    for _ in range(rounds or PROBE_ROUNDS):
        for i, fn in enumerate((baseline, candidate)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] / best[1]


def choose(setting: str, device: torch.device, module: nn.Module | None) -> str:
    """The kernels for the `nn.Linear` layers under `module` (the decoder, or the LM head): `torch` or
    `onednn`. For `auto` on a CPU with oneDNN: oneDNN in bfloat16; in float32 and float16 where the probe of the
    module's mix of shapes finds it at least MIN_SPEEDUP faster; torch where oneDNN has no kernel for the dtype
    on this CPU, and for a module with no `nn.Linear`."""
    if setting not in CHOICES:
        raise ValueError(f"`cpu_linear` must be one of {list(CHOICES)}, got {setting!r}.")
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)] if module is not None else []
    if device.type != "cpu" or setting == "torch" or not linears:
        return "torch"
    if not available():
        if setting == "onednn":
            raise ValueError("`cpu_linear` is 'onednn' but this torch build has no oneDNN linear kernel.")
        return "torch"
    dtype = linears[0].weight.dtype
    if dtype == torch.bfloat16 and not packs_bfloat16():
        if setting == "onednn":
            raise ValueError(
                "`cpu_linear` is 'onednn' but this CPU has no oneDNN bfloat16 kernel (needs AVX-512)."
            )
        return "torch"
    if setting == "onednn" or dtype == torch.bfloat16:  # bfloat16: oneDNN either way, reordered once here
        return "onednn"
    mix = tuple((i, o, n) for (i, o), n in linear_shapes(module).items())
    return "onednn" if onednn_speedup(dtype, mix) >= MIN_SPEEDUP else "torch"
