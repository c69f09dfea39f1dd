"""The load-time kernel probes under a CPU hog (issue 27 §5): `--cpu-linear auto` and `--cpu-attention auto`
decide once per process, so a probe run while the machine is busy must not lock in a slow kernel.

Each case times its two kernels (the default and the candidate, the very callables the probe times) quietly,
then runs the probe (`decide` over `time_pairs`, as `cpu_linear.probe` does) several times while busy-loop
processes, one per core, compete for the CPU at the test's own niceness. The kernel each hogged probe picks must
run, quietly, within LIMIT of the quietly fastest one. "Quiet" on a shared machine is each kernel's best time over
many interleaved calls: disturbance only adds time, so the least disturbed call estimates the undisturbed one.

Quiet times are measured before and after the hog (the best of both) by the probe's clock, one torch thread's
CPU time: on the shared 2-core machine this was written on (load average ~6 from a benchmark before the test
started), the engine threads' best wall times of the same float32 attention read sdpa/blocked 4.44/3.66 ms in
one run and 8.50/12.04 ms in the next, so no quiet wall-clock reference existed to compare with; the CPU-time
best moved by under 10% between runs, hog or not. The wall-clock best is printed beside it. Under the hog a naive probe (one wall-clock call of each on the engine's threads, the candidate
if it is the margin faster) also runs; how often it would pick beyond LIMIT is printed (`-s`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from contextlib import contextmanager

import pytest
import torch

from services.teacher.engine import cpu_attention, cpu_linear

LIMIT = 1.2
"""The chosen kernel's quiet time over the quiet best: the issue's bound."""
HOGGED_PROBES = 3
QUIET_ROUNDS = 20
NAIVE_PER_PROBE = 4
SMOLLM2_MLP = ((576, 1536, 1),)
"""One SmolLM2-135M up projection (hidden 576, intermediate 1536): the probe's rows for it are a real batch's."""
SMOLLM2_HEADS = (9, 3, 64)
"""SmolLM2-135M's attention: 9 query heads, 3 key/value heads, head dim 64."""


def _spin(stop) -> None:
    while not stop.is_set():
        pass


@contextmanager
def cpu_hog(n: int):
    """`n` busy-loop processes (forked: they never touch torch), stopped on exit."""
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    procs = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.2)  # every hog spinning before the probe starts
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()


def quiet_times(
    kernels: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Each kernel's best time in seconds by `clock` over `rounds` interleaved calls (after one warm-up each)."""
    for fn in kernels.values():
        fn()
    best = dict.fromkeys(kernels, float("inf"))
    for _ in range(rounds):
        for name, fn in kernels.items():
            t0 = clock()
            fn()
            best[name] = min(best[name], clock() - t0)
    return best


def reference_times(kernels: dict[str, Callable[[], object]]) -> dict[str, float]:
    """The quiet reference: one thread's CPU time (see the module docstring for why not wall time here)."""
    with cpu_linear.one_thread():
        return quiet_times(kernels, QUIET_ROUNDS, time.thread_time)


def _ms(times: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1e3:.2f}" for k, v in times.items())


def _linear_case(dtype):
    kernels = cpu_linear.probe_kernels(dtype, SMOLLM2_MLP)
    if kernels is None:
        pytest.skip(f"no oneDNN {dtype} kernel on this CPU")
    return ("torch", "onednn"), kernels, cpu_linear.MIN_SPEEDUP


def _attention_case(dtype):
    return ("sdpa", "blocked"), cpu_attention.probe_kernels(dtype, *SMOLLM2_HEADS), cpu_attention.MIN_SPEEDUP


CASES = {
    "linear-float32": lambda: _linear_case(torch.float32),
    "attention-float32": lambda: _attention_case(torch.float32),
    "attention-bfloat16": lambda: _attention_case(torch.bfloat16),
}
"""What `auto` probes: float32 (and float16) linears, attention in either dtype; bfloat16 linears are not probed
(oneDNN runs them either way: cpu_linear.choose_why)."""


@pytest.mark.skipif(not cpu_linear.available(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("case", list(CASES))
@torch.inference_mode()
def test_a_probe_under_a_cpu_hog_picks_within_limit_of_the_quiet_best(case):
    (default, candidate), (base_fn, cand_fn), margin = CASES[case]()
    kernels = {default: base_fn, candidate: cand_fn}
    before = reference_times(kernels)
    wall = quiet_times(kernels, QUIET_ROUNDS, time.perf_counter)  # the engine's threads: printed only
    chosen, naive = [], []
    with cpu_hog(os.cpu_count() or 2):
        for _ in range(HOGGED_PROBES):
            verdict = cpu_linear.probe(base_fn, cand_fn, margin)  # what `auto` runs at load time
            chosen.append((candidate if verdict.faster else default, verdict.why))
            for _ in range(NAIVE_PER_PROBE):  # one wall-clock call each on the engine's threads
                naive_v = cpu_linear.decide(cpu_linear.time_pairs(base_fn, cand_fn, 1, 1), margin)
                naive.append(candidate if naive_v.faster else default)
    after = reference_times(kernels)
    quiet = {k: min(before[k], after[k]) for k in kernels}
    ratio = {k: quiet[k] / min(quiet.values()) for k in quiet}
    naive_bad = sum(ratio[k] > LIMIT for k in naive)
    print(
        f"\n[probe] {case}: quiet best ms {_ms(quiet)} (1 thread, CPU time), {_ms(wall)} (wall); hogged: "
        + "; ".join(f"{k} ({why})" for k, why in chosen)
        + f"; naive one-shot picks beyond x{LIMIT}: {naive_bad}/{len(naive)}"
    )
    for kernel, why in chosen:
        assert ratio[kernel] <= LIMIT, (
            f"{case}: the hogged probe chose {kernel}, quietly x{ratio[kernel]:.2f} the best ({why}); "
            f"quiet times {quiet}"
        )
