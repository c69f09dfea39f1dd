"""`prefix-distill demo` (the shipped `route` pair, a few steps): the whole chain (embedded Redis, teacher service,
a short prefix-OPD job) runs,
prints the before/after figures and sample answers, writes metrics, summary and PNGs, and leaves no process
behind, also when interrupted with Ctrl-C (SIGINT) or SIGTERM in the middle of training.

Processes are followed through /proc: every descendant the demo ever had (Redis, the teacher front-end, its
spawned worker) must be gone when it exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.app.demo_report import ROWS

SHORT_JOB = [
    "--set", "batch_size=4", "--set", "micro_batch_size=4", "--set", "eval.prompts=6",
    "--set", "eval.batch_size=6", "--set", "tensorboard=false",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="follows processes through /proc"
)


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[1])  # a zombie counts as gone


def descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _ppid(int(entry))
            if ppid is not None:
                parents[int(entry)] = ppid
    out, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    return _ppid(pid) is not None


class Demo:
    """The demo as a child process; records every descendant it ever has."""

    def __init__(self, out: Path, *extra: str) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="200")
        self.log = out.parent / f"{out.name}.log"
        self._fh = open(self.log, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.app", "demo", "--out", str(out), *SHORT_JOB, *extra],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.seen: set[int] = set()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def watch_until(self, predicate, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and self.proc.poll() is None:
            self.seen |= descendants(self.proc.pid)
            if predicate():
                return
            time.sleep(0.2)

    def wait(self, timeout_s: float) -> int:
        self.watch_until(lambda: False, timeout_s)
        try:
            rc = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"demo still running after {timeout_s}s:\n{self.text()}") from None
        finally:
            self._fh.close()
        return rc

    def leftovers(self) -> list[int]:
        end = time.monotonic() + 5  # reaping is asynchronous
        while time.monotonic() < end and any(alive(p) for p in self.seen):
            time.sleep(0.1)
        return [p for p in self.seen if alive(p)]


def test_demo_prints_figures_writes_outputs_and_leaves_nothing_running(tmp_path):
    run = tmp_path / "run"
    demo = Demo(run, "--steps", "2")
    rc = demo.wait(240)
    out = demo.text()
    assert rc == 0, out
    assert len(demo.seen) >= 3, f"expected Redis, the teacher and its worker among {demo.seen}"
    assert demo.leftovers() == [], out

    # before/after figures: every table row present with two numbers and a change
    for key, label, _ in ROWS:
        if key in ("eval/accuracy", "eval/agreement", "eval/kl_head"):
            line = next((ln for ln in out.splitlines() if label in ln), None)
            assert line is not None, f"{label!r} missing:\n{out}"
            assert len([c for c in line.split("│") if c.strip()]) == 4, line
    assert "before (" in out and "after (" in out and "held-out prompt 'R" in out
    assert "prefix L=8 of 112 tokens" in out and "0.25 of rollouts full length (teacher)" in out
    assert "embedded Redis" in out and "nothing left running" in out

    summary = json.loads((run / "summary.json").read_text())
    for when in ("before", "after"):
        assert summary[when]["eval/kl"] >= 0 and "eval/accuracy" in summary[when]
        assert summary[f"sample_{when}"]["response"] is not None
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "progress/prefix_length" in r] == [1, 2]
    assert {r["progress/prefix_length"] for r in records if "progress/prefix_length" in r} == {8}
    assert {"kl_vs_flops.png", "training_kl.png"} <= set(summary["plots"])
    for name in summary["plots"]:
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (run / "final" / "config.json").is_file()
    assert "teacher front-end stopped" in (run / "teacher.log").read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_interrupted_during_training_stops_everything(tmp_path, sig):
    run = tmp_path / "run"
    demo = Demo(run, "--steps", "400")
    demo.watch_until(lambda: "step 20/400" in demo.text(), 180)  # training is under way
    assert demo.proc.poll() is None and "step 20/400" in demo.text(), demo.text()
    demo.proc.send_signal(sig)
    rc = demo.wait(60)
    out = demo.text()
    assert rc == 130, out
    assert "interrupted" in out
    assert len(demo.seen) >= 3, demo.seen
    assert demo.leftovers() == [], out


@pytest.mark.parametrize("pair", ["route", "relay"])
def test_the_demo_job_is_the_benchmark_method_it_names(pair):
    """configs/demo*.yaml run DEMO_METHODS[pair] as bench/paper_methods.py defines it, at route's swept rate
    (relay was not swept: bench/paper_lr.json)."""
    from bench.paper_methods import COMMON, METHODS
    from bench.paper_tune import chosen_lr
    from services.app.demo import CONFIGS, DEMO_METHODS, PAIRS
    from trainer.config import load_config

    method = DEMO_METHODS[pair]
    places = ["student=student-dir", "teacher=grpc://127.0.0.1:50051"]
    demo = load_config(CONFIGS / PAIRS[pair], places)
    bench = load_config(
        None,
        [*COMMON, *METHODS[method], f"prompts=builtin:{pair}", f"lr={chosen_lr('route', method)}", *places],
    )
    for field in ("prompts", "batch_size", "lr", "lr_schedule", "max_new_tokens", "loss", "prefix", "anchor",
                  "freeze", "lora", "temperature", "grad_clip", "weight_decay"):  # fmt: skip
        assert getattr(demo, field) == getattr(bench, field), field


@pytest.mark.parametrize("seeds_reached", [3, 2, 0])
def test_the_demo_says_whether_its_method_reached_full_opd_in_the_benchmark(tmp_path, seeds_reached):
    """'Reached' means every seed and the final mean (trainer.reach.reaches): 2 of 3 seeds is not reached."""
    import json

    from rich.console import Console

    from services.app.demo_report import DemoResult, full_opd_reference, print_results

    def run(method, seed, agreements):
        curve = [{"step": 50 * i, "flops": 1e12 * (i + 1), "accuracy": 0.5, "agreement": a, "execution": 1.0}
                 for i, a in enumerate(agreements)]  # fmt: skip
        return {"task": "route", "method": method, "seed": seed, "curve": curve, "accuracy": 0.5,
                "agreement": agreements[-1], "execution": 1.0}  # fmt: skip

    records = [run("full", s, [0.25, 0.35, 0.42]) for s in range(3)]  # target: 0.42 - 0.02
    records += [
        run("tail-L8", s, [0.25, 0.45, 0.45] if s < seeds_reached else [0.25, 0.3, 0.3]) for s in range(3)
    ]
    bench = tmp_path / "paper_table.json"
    bench.write_text(json.dumps({"meta": {}, "records": records}))
    ref = full_opd_reference("route", "tail-L8", bench)
    assert ref["reached_seeds"] == seeds_reached and ref["reached"] == (seeds_reached == 3), ref
    assert abs(ref["target"] - 0.40) < 1e-9 and ref["full_reach"] == 3e12, ref
    result = DemoResult(tmp_path, {"eval/agreement": 0.25}, {"eval/agreement": 0.45}, None, None,
                        {"flops/cum_total": 1e12}, [], full_opd=ref)  # fmt: skip
    console = Console(record=True, width=200)
    print_results(console, result, steps=600)
    text = console.export_text()
    if seeds_reached == 3:
        assert "2e+12 FLOPs, full OPD 3e+12" in text and "1.5x less" in text and "3/3 seeds" in text, text
    else:
        assert "did not reach full OPD's agreement (40.0%)" in text and "x less" not in text, text
        assert f"{seeds_reached}/3 seeds" in text, text
