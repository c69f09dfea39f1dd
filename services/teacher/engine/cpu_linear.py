"""Linear layers on oneDNN with pre-packed weights, for CPU engines.

torch's CPU wheels run float32 `nn.Linear` on MKL. On an AMD EPYC with AVX-512 (2 cores), a SmolLM2-sized
projection (2048 x 576 @ 576 x 1536) ran at ~200 GFLOPS on MKL against ~450 on oneDNN with the weight packed once
into oneDNN's blocked layout (torch's own `mkldnn._linear_pointwise` op): the float32 SmolLM2 engine went from
~450 to ~800 positions/s. The two kernels sum in different orders, so float32 results differ at rounding level
(max 4.6e-5 nats on SmolLM2); `choose` times both on the model's mix of projection shapes once per process and
keeps oneDNN where it is the margin faster in the median of several interleaved trials and the margin slower in
none (`decide`: a probe on a busy machine that reads both ways keeps torch), so a CPU where MKL wins (or a torch
without oneDNN) keeps plain torch. On 2 Zen 4 EPYC cores (AVX-512 on 256-bit units, ~140-210 GFLOPS) oneDNN ran the float32 engine 1.2-1.3x faster than MKL.

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

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Rows of the activation the weight layout is packed for (a hint: any row count runs).
PACK_ROWS_HINT = 1024
# oneDNN is kept when the probe finds it at least this much faster than torch. Its float32 sums differ from MKL's
# at rounding level only, and the engine's LM head ran on oneDNN on every CPU measured, so the margin guards only
# against flipping between two equal kernels: 1.15 (an earlier value) sat inside the probe's noise on 2 Zen 4
# EPYC cores, where oneDNN ran the float32 trunk 1.2x faster and a 256-row probe of one shape read 1.03-1.32x.
MIN_SPEEDUP = 1.05
# A probe times each projection shape on about this many FLOPs (`probe_rows`), in PROBE_TRIALS trials of
# PROBE_ROUNDS interleaved rounds each (see `decide`).
PROBE_FLOPS = 8e9
PROBE_TRIALS = 3
PROBE_ROUNDS = 8
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


@dataclass(frozen=True)
class Verdict:
    """What a probe found: take the candidate kernel or keep the default, and why (logged at start-up)."""

    faster: bool
    """Take the candidate: the margin faster in the median trial, slower by the margin in none (`decide`)."""
    ratios: tuple[float, ...]
    """Per trial: the baseline's best time over the candidate's (> 1: the candidate is faster)."""
    won: int
    """Interleaved pairs of timings in which the candidate was the faster, of `pairs`."""
    pairs: int
    why: str

    @property
    def speedup(self) -> float:
        """The median trial's ratio (0 for no trials)."""
        return statistics.median(self.ratios) if self.ratios else 0.0


def decide(trials: Sequence[Sequence[tuple[float, float]]], margin: float) -> Verdict:
    """The choice between a default (baseline) kernel and a candidate from timings, a pure function: `trials`
    holds, per trial, interleaved (baseline_s, candidate_s) pairs. The candidate is taken only when its best time
    is at least `margin` faster than the baseline's in the median trial, no trial reads the other way (the
    baseline `margin` faster: one 1.3x, another 0.9x is a probe on a busy machine, whose noise would otherwise
    decide for the whole life of the process), and it wins most pairs; otherwise the default stays. A wrong default costs at most the candidate's speed-up; a wrong candidate, whatever a noisy
    probe made it look. The margin binds the median, not every trial: with `probe`'s CPU-time clock, float32
    blocked attention, 1.25-1.28x faster quietly, read x1.06-1.19 over three trials under a CPU hog, and
    asking every trial for x1.1 threw it back to sdpa, and asking every trial for x1 still did once in nine
    probes (a trial read x0.99; tests/test_probe_under_load.py)."""
    ratios = tuple(min(b for b, _ in t) / min(c for _, c in t) for t in trials if t)
    pairs = sum(len(t) for t in trials)
    won = sum(c < b for t in trials for b, c in t)
    span = f"x{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} trials" if ratios else "no timings"
    wins = f"faster in {won}/{pairs} pairs"
    if not ratios:
        return Verdict(False, ratios, won, pairs, "no timings: the default")
    mid = statistics.median(ratios)
    if min(ratios) * margin > 1 and mid >= margin and 2 * won > pairs:
        return Verdict(True, ratios, won, pairs, f"{span}, {wins}, median x{mid:.2f} >= x{margin:g}")
    if max(ratios) < margin:
        return Verdict(False, ratios, won, pairs, f"{span}, under x{margin:g}: the default")
    return Verdict(False, ratios, won, pairs, f"ambiguous ({span}, {wins}): the default")


def time_pairs(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    trials: int,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[tuple[float, float]]]:
    """`trials` x `rounds` interleaved timings (baseline_s, candidate_s) by `clock` after one warm-up call of each;
    the two alternate which runs first, so a noisy stretch of a shared machine falls on both sides alike."""
    baseline(), candidate()
    out = []
    for _ in range(trials):
        pairs = []
        for r in range(rounds):
            times = {}
            for name, fn in (("b", baseline), ("c", candidate))[:: 1 if r % 2 == 0 else -1]:
                t0 = clock()
                fn()
                times[name] = clock() - t0
            pairs.append((times["b"], times["c"]))
        out.append(pairs)
    return out


@contextlib.contextmanager
def one_thread():
    """torch's intra-op threads set to 1 inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def probe(
    baseline, candidate, margin: float, trials: int = PROBE_TRIALS, rounds: int = PROBE_ROUNDS
) -> Verdict:
    """Times `candidate()` against `baseline()` (`time_pairs`) and decides (`decide`), on one torch thread by that
    thread's CPU time (`time.thread_time`): a busy machine then only takes turns from the probe, which that clock
    does not count, instead of adding its turns to the times. Wall time on the engine's threads did not survive
    a CPU hog (a busy-loop process per core, tests/test_probe_under_load.py): on 2 shared EPYC cores the same
    float32 attention read sdpa/blocked x0.61-3.32 over four runs (one thread's wall time would still count the
    hog's turns), each preemption of one of two threads stalling the other at the kernel's next barrier (blocked
    attention has dozens per call); one thread's CPU time read x1.14-1.32, quiet or hogged alike (the linear
    x1.13-1.16, bfloat16 attention x1.59-1.92). The price: a ratio per core, which a kernel that scales worse
    over threads than the other would overstate. Best times per trial: medians swung more."""
    with one_thread():
        return decide(time_pairs(baseline, candidate, trials, rounds, clock=time.thread_time), margin)


def probe_kernels(dtype: torch.dtype, shapes: tuple[tuple[int, int, int], ...]):
    """The two sides `onednn_probe` times, as (torch, onednn) callables running the projections `shapes` ((in, out,
    count) each, a model's mix) in `dtype` on `probe_rows` random rows; None where oneDNN has no kernel for the
    dtype on this CPU. Call under `torch.inference_mode()`."""
    torch.manual_seed(0)
    counts = {(i, o): n for i, o, n in shapes}
    rows = probe_rows(counts)
    plain = {s: nn.Linear(*s, bias=False).to(dtype) for s in counts}
    xs = {i: torch.randn(rows, i, dtype=dtype) for i, _ in counts}  # (rows, in) per input width
    try:
        packed = {s: PackedLinear(lin) for s, lin in plain.items()}
    except RuntimeError:  # no oneDNN kernel for this dtype on this CPU
        return None

    least = min(counts.values())
    calls = [(s, min(4, round(n / least))) for s, n in counts.items()]  # the mix, in small whole numbers

    def run(layers) -> None:
        for s, n in calls:
            for _ in range(n):
                layers[s](xs[s[0]])

    return (lambda: run(plain)), (lambda: run(packed))


@functools.cache
@torch.inference_mode()
def onednn_probe(dtype: torch.dtype, shapes: tuple[tuple[int, int, int], ...]) -> Verdict | None:
    """Whether oneDNN runs the projections `shapes` ((in, out, count) each, a model's mix) in `dtype` at least
    MIN_SPEEDUP faster than torch on this CPU, by `probe` of `probe_kernels`; None where oneDNN has no kernel for
    the dtype. Measured once per process, dtype and mix, so every engine of a process makes the same choice."""
    if not available():
        return None
    kernels = probe_kernels(dtype, shapes)
    return None if kernels is None else probe(*kernels, MIN_SPEEDUP)


def choose(setting: str, device: torch.device, module: nn.Module | None) -> str:
    """The kernels for the `nn.Linear` layers under `module`: `choose_why`'s choice."""
    return choose_why(setting, device, module)[0]


def choose_why(setting: str, device: torch.device, module: nn.Module | None) -> tuple[str, str]:
    """The kernels for the `nn.Linear` layers under `module` (the decoder, or the LM head), `torch` or `onednn`,
    and why (for the start-up log). For `auto` on a CPU with oneDNN: oneDNN in bfloat16; in float32 and float16
    where the probe of the module's mix of shapes finds it MIN_SPEEDUP faster in the median trial, the margin slower in none (`decide`);
    torch where oneDNN has no kernel for the dtype on this CPU, and for a module with no `nn.Linear`."""
    if setting not in CHOICES:
        raise ValueError(f"`cpu_linear` must be one of {list(CHOICES)}, got {setting!r}.")
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)] if module is not None else []
    if device.type != "cpu":
        return "torch", f"on {device.type}"
    if setting == "torch":
        return "torch", "asked for"
    if not linears:
        return "torch", "no nn.Linear"
    if not available():
        if setting == "onednn":
            raise ValueError("`cpu_linear` is 'onednn' but this torch build has no oneDNN linear kernel.")
        return "torch", "no oneDNN in this torch"
    dtype = linears[0].weight.dtype
    if dtype == torch.bfloat16 and not packs_bfloat16():
        if setting == "onednn":
            raise ValueError(
                "`cpu_linear` is 'onednn' but this CPU has no oneDNN bfloat16 kernel (needs AVX-512)."
            )
        return "torch", "no oneDNN bfloat16 kernel on this CPU"
    if setting == "onednn":
        return "onednn", "asked for"
    if dtype == torch.bfloat16:  # oneDNN either way, reordered once here
        return "onednn", "bfloat16 runs on oneDNN anyway: packed once"
    mix = tuple((i, o, n) for (i, o), n in linear_shapes(module).items())
    verdict = onednn_probe(dtype, mix)
    if verdict is None:
        return "torch", f"no oneDNN {str(dtype).removeprefix('torch.')} kernel"
    return ("onednn" if verdict.faster else "torch"), f"probe: {verdict.why}"
