"""`bench/paper_table.py --quick` runs the whole pipeline of the paper table (every method, both decision tasks,
the analyses, the report) through a real teacher service: a smoke test of the pipeline, not of the claim; and
the report's arithmetic (compute to reach, the learning-rate choice) on records written by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.paper_methods import COMMON, METHODS, TASKS

ROOT = Path(__file__).resolve().parents[1]


PLACES = ["student=student-dir", "teacher=grpc://127.0.0.1:50051"]
"""Required by a job, not read here."""
QUICK_METHODS = ("full", "prefix-L2", "prefix-L32", "seqkd", "sft-gold")
"""The pipeline on the methods whose FLOP ledgers this test compares (every method's settings:
test_every_method_is_a_valid_job)."""


@pytest.mark.timeout(600)
def test_quick_paper_table_writes_every_record_table_and_plot(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "paper_table.py"),
            "--quick",
            "--methods",
            ",".join(QUICK_METHODS),
            "--out",
            str(tmp_path),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "paper_table.json").read_text())
    records = data["records"]
    assert {(r["task"], r["method"]) for r in records} == {(t, m) for t in TASKS for m in QUICK_METHODS}
    for r in records:
        f = r["flops"]
        assert (
            0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0 and 0.0 <= r["execution"] <= 1.0
        ), r
        assert f["total"] == f["sampling"] + f["teacher"] + f["training"] and f["total"] > 0
        assert [p["step"] for p in r["curve"]] == [0, 2, 4], "an evaluation every 2 steps, the start included"
    by = {(r["task"], r["method"]): r for r in records}
    for task in TASKS:
        # the FLOP ledger orders the methods as their rollouts do: shorter prefixes cost less than full answers
        assert (
            by[task, "prefix-L2"]["flops"]["total"]
            < by[task, "prefix-L32"]["flops"]["total"]
            < by[task, "full"]["flops"]["total"]
        )
        assert by[task, "seqkd"]["flops"]["teacher"] == 0 and by[task, "sft-gold"]["flops"]["sampling"] == 0
        assert set(data["analyses"][task]["rescue"]) == {"0", "1", "2", "8", "32", "64", "112"}
    text = (tmp_path / "paper_table.md").read_text()
    assert "## Verdict" in text and "builtin:route" in text and "builtin:relay" in text
    for name in ("paper_table.png", "rescue.png", "kl_position.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def _run(method, seed, accs, flops, agreement=None):
    curve = [
        {"step": 10 * i, "flops": f, "accuracy": a, "agreement": (agreement or accs)[i], "execution": 1.0}
        for i, (a, f) in enumerate(zip(accs, flops, strict=True))
    ]
    return {"task": "route", "method": method, "seed": seed, "accuracy": accs[-1], "agreement": (agreement or accs)[-1],
            "curve": curve}  # fmt: skip


def test_compute_to_reach_is_the_first_evaluation_within_two_points_of_full():
    from bench.paper_report import reach, reach_stats, targets

    full = [_run("full", s, [0.3, 0.7, 0.9, 0.9], [0, 1e10, 2e10, 3e10]) for s in range(2)]
    tg = targets({"full": full})
    assert abs(tg["accuracy"] - 0.88) < 1e-12
    assert reach(full[0]["curve"], "accuracy", tg["accuracy"]) == 2e10
    fast = _run("prefix-L8", 0, [0.3, 0.89, 0.5], [0, 1e9, 2e9])
    assert reach(fast["curve"], "accuracy", tg["accuracy"]) == 1e9, "reached once, even if it drops later"
    never = _run("prefix-L2", 0, [0.3, 0.87, 0.8], [0, 1e9, 2e9])
    assert reach_stats([never, fast], "accuracy", tg["accuracy"]) == (1e9, 0.0, 1)


def test_the_verdict_separates_a_prefix_that_kept_execution_from_one_that_broke_it():
    from bench.paper_report import verdict

    def run(method, agreement, execution):
        r = _run(method, 0, [0.5, 0.6], [0, 1e10], agreement=[0.25, agreement])
        return r | {"execution": execution, "start": {"agreement": 0.25}}

    records = [run("full", 0.40, 1.0), run("tail-L8", 0.45, 0.99), run("prefix-L8", 0.41, 0.20),
               run("readout-L8", 0.25, 1.0)]  # fmt: skip
    lines = verdict(records, "route")
    (safety,) = [line for line in lines if "safety" in line]
    assert "`tail-L8` kept execution" in safety and "`prefix-L8` 20.0%" in safety, safety
    (readout,) = [line for line in lines if "`readout-L8`" in line]
    assert "agreement 25.0% -> 25.0% (full 40.0%)" in readout, readout


def test_learning_rate_choice_prefers_accuracy_then_agreement_then_the_smaller_rate():
    from bench.paper_tune import choose

    trials = [
        {"lr": 3e-4, "accuracy": 0.50, "agreement": 0.9},
        {"lr": 1e-3, "accuracy": 0.80, "agreement": 0.6},
        {"lr": 3e-3, "accuracy": 0.795, "agreement": 0.7},
    ]
    assert choose(trials) == 3e-3, "within a point of the best accuracy, the better agreement wins"
    trials[2]["agreement"] = 0.6
    assert choose(trials) == 1e-3, "a tie: the smaller rate"


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_is_a_valid_job(method):
    """Each method's overrides of COMMON load as a trainer job (the config's own validation), and say what
    the method's name says: its prefix, rollout source, loss and trained parameters."""
    from trainer.config import load_config

    cfg = load_config(None, [*COMMON, *METHODS[method], "prompts=builtin:route", "lr=1e-3", *PLACES])
    if method.startswith(("prefix-L", "readout-L", "tail-L", "tailref-L", "l2-L", "lora-L", "offpolicy-L")):
        assert cfg.prefix.schedule == "constant" and cfg.prefix.length == int(method.rsplit("L", 1)[1])
    assert (cfg.loss == "nll") == (method in ("seqkd", "sft-gold"))
    assert bool(cfg.freeze) == (method == "readout-L8")
    assert bool(cfg.lora and cfg.lora.rank) == method.startswith("lora")
    assert (cfg.anchor.tail_fraction > 0) == method.startswith("tail")


def test_combine_joins_runs_made_task_by_task_and_refuses_different_settings():
    from bench.paper_table import combine

    def part(task, seeds, wall, method="full"):
        meta = {"quick": False, "seeds": seeds, "common": ["steps=600"], "wall_s": wall, "date": "2026-12-07"}
        records = [{"task": task, "method": method, "seed": s} for s in seeds]
        return {"meta": meta, "analyses": {task: {"rescue": {}}}, "records": records}

    both = combine([part("route", [0, 1, 2], 60.0), part("relay", [0, 1, 2], 30.0)])
    assert both["meta"]["wall_s"] == 90.0 and set(both["analyses"]) == {"route", "relay"}
    assert [r["task"] for r in both["records"]] == ["route"] * 3 + ["relay"] * 3
    fewer = combine([part("route", [0, 1, 2], 60.0), part("relay", [0, 1], 30.0)])
    assert fewer["meta"]["seeds_by_task"] == {"route": [0, 1, 2], "relay": [0, 1]}
    # a third seed run on its own joins the task's first two (the last part does not replace them)
    third = combine([part("relay", [0, 1], 30.0), part("relay", [2], 10.0), part("relay", [0], 5.0, "seqkd")])
    assert third["meta"]["seeds_by_task"] == {"relay": [0, 1, 2]} and len(third["records"]) == 4
    with pytest.raises(AssertionError, match="twice"):
        combine([part("relay", [0, 1], 30.0), part("relay", [1], 10.0)])
    other = part("relay", [0, 1], 30.0)
    other["meta"]["common"] = ["steps=200"]
    with pytest.raises(AssertionError, match="common"):
        combine([part("route", [0, 1, 2], 60.0), other])


def test_the_split_table_puts_the_sweeps_seed_zero_beside_the_tables_at_the_chosen_rate():
    from bench.paper_report import split_rows

    def run(seed, lr, agreement):
        r = _run("full", seed, [0.5, 0.6], [0, 1e10], agreement=[0.25, agreement])
        return r | {"lr": lr, "execution": 1.0}

    records = [run(0, 3e-4, 0.32), run(1, 3e-4, 0.24)]
    trial = {"accuracy": 0.62, "agreement": 0.44, "execution": 0.99, "flops": 1e10}
    sweep = {"tasks": {"route": {"full": {"lr": 3e-4, "trials": [trial | {"lr": 3e-4}, trial | {"lr": 1e-3,
             "agreement": 0.9}]}}}}  # fmt: skip
    rows = split_rows(records, "route", sweep)
    assert rows[2] == "| full | 0.0003 | 44.0 / 62.0 / 99.0 | 32.0 / 60.0 / 100.0 | 28.0 ± 5.7 |", rows
    assert split_rows(records, "relay", sweep) == [], "no sweep of that task: no table"
