"""The fault suite (bench/faults.py) under a steady load of several jobs: nothing lost, nothing answered twice,
nothing wrong. The quick part (a worker kill -9, then a Redis restart that loses the queue) runs in `make test`;
every scenario (repeated worker kills, Redis with and without AOF, a front-end restart under a streaming trainer,
a trainer kill -9 and resume) runs in `make test-faults` and writes bench/results/faults.{md,json}."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import faults  # noqa: E402


def check(figures) -> None:
    for f in figures:
        print(f)
        assert f.answered > 0 and f.lost == 0 and f.twice == 0 and f.wrong == 0, f


def test_quick_faults_lose_nothing(tmp_path):
    check(faults.scenarios(tmp_path, quick=True, jobs=2))


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.timeout(1800)
def test_every_fault_loses_nothing():
    out = BENCH / "results" / "faults"
    assert faults.main(["--out", str(out)]) == 0, out.with_suffix(".md").read_text()
    import json

    check([faults.Figures(**f) for f in json.loads(out.with_suffix(".json").read_text())])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_trainer_rides_out_a_60s_redis_outage(tmp_path):
    """A real training run (bench/faults.py's trainer, default client options) through Redis stopped for 60 s
    after its third step and started again empty: it exits 0, every request its steps made was answered, and its
    metrics equal an uninterrupted run's (the old budget, 20 retries, gave up within ~35 s)."""
    figures = faults.redis_outage_with_trainer(tmp_path, down_s=60.0)
    check([figures])
    assert figures.note.startswith("exit 0;") and figures.recovery_s >= 60.0, figures
