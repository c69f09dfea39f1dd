"""Compute to reach a target: the measure that compares methods by what they spend, not by equal step counts.

A run's curve is its evaluations, each {step, flops (cumulative: sampling + teacher + training), accuracy,
agreement, execution}. Its compute to reach a target is the FLOPs at its first evaluation at or above the
target (no interpolation: an evaluation is what was measured). The target of a comparison is `full`'s final
mean minus 2 points. Pure functions over records (dicts), shared by the benchmark's report and the demo.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable

WITHIN = 0.02
"""A method 'reaches' full OPD when it comes within 2 points of full's final mean."""


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """(mean, sample std) of the values that are numbers; (nan, nan) when none."""
    got = [v for v in values if v is not None and not math.isnan(v)]
    if not got:
        return float("nan"), float("nan")
    return statistics.fmean(got), (statistics.stdev(got) if len(got) > 1 else 0.0)


def by_method(records: list[dict], task: str, order: Iterable[str] = ()) -> dict[str, list[dict]]:
    """The records of `task` grouped by method, methods in `order` first, then as they come."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r["task"] == task:
            groups[r["method"]].append(r)
    first = [m for m in order if m in groups]
    names = first + [m for m in groups if m not in first]
    return {m: groups[m] for m in names}


def reach(curve: list[dict], key: str, target: float) -> float | None:
    """FLOPs at the first evaluation whose `key` is >= target (None: never within the run)."""
    for p in curve:
        if p[key] >= target - 1e-9:
            return p["flops"]
    return None


def targets(groups: dict[str, list[dict]]) -> dict[str, float]:
    """full's final mean accuracy and agreement, minus 2 points: what 'reaching full' means."""
    full = groups.get("full", [])
    return {k: mean_std([r[k] for r in full])[0] - WITHIN for k in ("accuracy", "agreement")}


def reach_stats(runs: list[dict], key: str, target: float) -> tuple[float, float, int]:
    """(mean, std of the FLOPs to reach over the seeds that reached, how many reached)."""
    got = [h for h in (reach(r["curve"], key, target) for r in runs) if h is not None]
    m, s = mean_std(got)
    return m, s, len(got)


def final(runs: list[dict], key: str) -> float:
    """The mean over seeds of each run's final `key`."""
    return mean_std([r[key] for r in runs])[0]


def reaches(runs: list[dict], key: str, target: float) -> bool:
    """Every seed came to `target` on `key`, and the final mean is still there (reached once and kept): what
    'this method reached full' means, in the benchmark's report and in the demo alike."""
    return bool(runs) and reach_stats(runs, key, target)[2] == len(runs) and final(runs, key) >= target
