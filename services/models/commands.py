"""CLI commands `prefix-distill models ...`: prepare SmolLM2 teacher/student folders, build tiny models."""

from __future__ import annotations

from pathlib import Path

import typer

from services.models.testbed import pair_names

TESTBED = " | ".join(pair_names())
"""The testbed pairs `prepare` accepts (route and relay; plan and chain are withdrawn, kept to reproduce)."""

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
    name: str = typer.Argument(
        "smollm2",
        help=f"What to prepare: smollm2 (SmolLM2-135M-Instruct pair) | {TESTBED} (testbed pairs, shipped; "
        "plan and chain are withdrawn: a prompt-independent answer was valid on them).",
    ),
    student_layers: int = typer.Option(
        6, "--student-layers", help="smollm2: decoder layers the student keeps (of 30)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Folder (default: $PREFIX_DISTILL_CACHE or ~/.cache; testbed: the shipped copy)."
    ),
    rebuild: bool = typer.Option(
        False,
        "--rebuild",
        help=f"{TESTBED}: train the pair again from its seeds (30-45 min a pair on 2 cores; the shipped "
        "figures in services/models/pairs/NAME/build.json).",
    ),
) -> None:
    """Prepare a teacher and a student folder: SmolLM2 from its GGUF, or a testbed pair (shipped or rebuilt)."""
    from services.util.progress import quiet_progress_bars

    quiet_progress_bars()
    try:
        if name == "smollm2":
            from services.models.smollm2 import prepare_smollm2

            paths = prepare_smollm2(out, student_layers=student_layers)
        else:
            from services.models.testbed import prepare_pair

            if name not in pair_names():
                raise ValueError(
                    f"name: unknown model pair {name!r}; expected smollm2, {', '.join(pair_names())}."
                )
            paths = prepare_pair(name, out, rebuild=rebuild, say=typer.echo)
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"teacher: {paths.teacher}\nstudent: {paths.student}")
