"""What a run achieved (`RunSummary`), read back from its metrics.jsonl and samples.jsonl by `summarize`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.metrics import read_metrics, read_samples


@dataclass
class RunSummary:
    """What a run achieved: the figures a demo prints and a benchmark tabulates."""

    output_dir: str
    final_dir: str
    steps: int
    before: dict[str, float] = field(default_factory=dict)
    """eval/* before the first step (empty without eval.at_start)."""
    after: dict[str, float] = field(default_factory=dict)
    """eval/* after the last step."""
    samples_before: list[dict] = field(default_factory=list)
    samples_after: list[dict] = field(default_factory=list)
    flops: dict[str, float] = field(default_factory=dict)
    """Cumulative training FLOPs (flops/cum_sampling, cum_training, cum_teacher, cum_total), all ranks."""
    wall_s: float = 0.0
    metrics_path: str = ""


def summarize(run_dir: str | Path) -> RunSummary:
    """RunSummary of a finished run, read back from its metrics.jsonl and samples.jsonl."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    steps = [r for r in rows if "progress/prefix_length" in r]

    def eval_keys(r):
        return {k: v for k, v in r.items() if k.startswith("eval/")}

    samples = read_samples(run_dir)
    last = steps[-1] if steps else {}
    return RunSummary(
        output_dir=str(run_dir),
        final_dir=str(run_dir / "final"),
        steps=int(last.get("progress/step", 0)),
        before=eval_keys(evals[0]) if evals and evals[0]["step"] == 0 else {},
        after=eval_keys(evals[-1]) if evals and evals[-1]["step"] > 0 else {},
        samples_before=samples[0]["samples"] if samples and samples[0]["step"] == 0 else [],
        samples_after=samples[-1]["samples"] if samples and samples[-1]["step"] > 0 else [],
        flops={k: v for k, v in last.items() if k.startswith("flops/cum_")},
        metrics_path=str(run_dir / "metrics.jsonl"),
    )
