"""CLI of the trainer: `prefix-distill train --config run.yaml --set key=value --resume` and `plot RUN_DIR...`.

Thin: build the config, call `trainer.loop.train`, print the summary. Under `torchrun` the same command runs
as one DDP rank (`torchrun --nproc_per_node 2 -m trainer train --config run.yaml`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def print_summary(summary) -> None:
    """Before/after figures and one sample answer, as the demo shows them."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"run {summary.output_dir} ({summary.steps} steps, {summary.wall_s:.0f} s)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")

    def fmt(d: dict, key: str) -> str:
        return f"{d[key]:.4g}" if d.get(key) is not None else "-"

    for key in ("eval/accuracy", "eval/kl_head", "eval/kl_tail", "eval/kl", "eval/response_tokens"):
        if key in summary.before or key in summary.after:
            table.add_row(key, fmt(summary.before, key), fmt(summary.after, key))
    console.print(table)
    if summary.flops:
        console.print("cumulative FLOPs: " + ", ".join(f"{k[10:]}={v:.3g}" for k, v in summary.flops.items()))
    for name, samples in (("before", summary.samples_before), ("after", summary.samples_after)):
        if samples:
            s = samples[0]
            console.print(
                f"[bold]sample {name}[/bold] (answer {s.get('answer')}, correct {s.get('correct')}):",
                highlight=False,
            )
            console.print(f"  {s['response']!r}", highlight=False, markup=False)
    console.print(f"final model: {summary.final_dir}")


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        config: Path = typer.Option(
            None, "--config", "-c", help="Run YAML (keys of the configuration reference)."
        ),
        set_: list[str] = typer.Option(
            [], "--set", help="Override key=value (dotted keys, e.g. prefix.length=32)."
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Continue from the newest checkpoint in output_dir."
        ),
    ) -> None:
        """On-policy (prefix) distillation of a student against a teacher service."""
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        from services.teacher.errors import TeacherError
        from trainer.config import ConfigError, load_config
        from trainer.loop import train as run_train
        from trainer.teacher_io import TeacherMismatch

        try:
            cfg = load_config(config, set_)
        except ConfigError as err:
            _fail(str(err))
        try:
            summary = run_train(cfg, resume=resume)
        except TeacherMismatch as err:
            _fail(f"teacher refused: {err}")
        except TeacherError as err:
            _fail(f"teacher error ({err.code}): {err.message}")
        except (ValueError, OSError) as err:
            _fail(str(err))
        if int(os.environ.get("RANK", "0")) == 0:
            print_summary(summary)

    @app.command()
    def plot(
        run_dirs: list[Path] = typer.Argument(..., help="Run folders (each with a metrics.jsonl)."),
        out: Path = typer.Option(
            None, "--out", "-o", help="Folder for the PNGs (default: the first run folder)."
        ),
    ) -> None:
        """PNGs of eval accuracy and KL against cumulative training FLOPs, one line per run."""
        from trainer.plot import plot_runs

        try:
            paths = plot_runs(run_dirs, out or run_dirs[0])
        except FileNotFoundError as err:
            _fail(str(err))
        for p in paths:
            typer.echo(str(p))
