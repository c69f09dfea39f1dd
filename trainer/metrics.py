"""Run outputs that are read back: metrics.jsonl (one JSON object per record), TensorBoard events, samples.jsonl.

Each metrics record has `step` (completed optimizer steps) and namespaced keys: progress/, loss/, teacher/,
flops/, time/ for training steps, eval/ (plus flops/cum_* and progress/step) for evaluations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"


def _clean(value: float) -> float | None:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsWriter:
    """Appends records to metrics.jsonl and TensorBoard (rank 0 only)."""

    def __init__(self, output_dir: Path, *, tensorboard: bool, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / METRICS
        if resume_step is not None:
            truncate_after(self.path, resume_step)
            truncate_after(Path(output_dir) / SAMPLES, resume_step)
        elif self.path.exists():
            self.path.unlink()
            (Path(output_dir) / SAMPLES).unlink(missing_ok=True)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(Path(output_dir) / "tensorboard"),
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _clean(float(v)) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        with (self.path.parent / SAMPLES).open("a") as f:
            f.write(json.dumps({"step": step, "samples": samples}) + "\n")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_after(path: Path, step: int) -> None:
    """Drops records with `step` > step (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_samples(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / SAMPLES
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
