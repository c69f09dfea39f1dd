"""`bench/paper_table.py --quick` runs the whole pipeline of the paper table (every method, both tasks, the
analyses, the report) through a real teacher service: a smoke test of the pipeline, not of the claim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.paper_methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_quick_paper_table_writes_every_record_table_and_plot(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "paper_table.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "paper_table.json").read_text())
    records = data["records"]
    assert {(r["task"], r["method"]) for r in records} == {(t, m) for t in ("plan", "chain") for m in METHODS}
    for r in records:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["flops_total"] > 0 and r["wall_s"] > 0, r
        assert r["flops_total"] == r["flops_sampling"] + r["flops_teacher"] + r["flops_training"]
    by = {(r["task"], r["method"]): r for r in records}
    for task in ("plan", "chain"):
        # the FLOP ledger orders the methods as their rollouts do: shorter prefixes cost less than full answers
        assert (
            by[task, "prefix-L2"]["flops_total"]
            < by[task, "prefix-L16"]["flops_total"]
            < by[task, "full"]["flops_total"]
        )
        assert by[task, "seqkd"]["flops_teacher"] == 0 and by[task, "sft-gold"]["flops_sampling"] == 0
    for t in data["tasks"]:
        assert set(t["before"]["rescue"]) == {str(L) for L in (0, 2, 4, 8, 16, 32)}
    text = (tmp_path / "paper_table.md").read_text()
    assert "## Verdict" in text and "builtin:plan" in text and "builtin:chain" in text
    for name in ("paper_table.png", "rescue.png", "kl_position.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_accuracy_at_interpolates_in_log_flops_and_never_extrapolates():
    from bench.paper_report import accuracy_at

    curve = [(0.0, 0.1), (1e9, 0.2), (1e10, 0.6), (1e11, 0.9)]
    assert accuracy_at(curve, 1e10) == 0.6
    assert abs(accuracy_at(curve, 10**9.5) - 0.4) < 1e-12  # halfway in log FLOPs
    assert accuracy_at(curve, 2e11) is None  # the run never spent that much
