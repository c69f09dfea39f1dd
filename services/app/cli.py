"""The `prefix-distill` console script: one typer app assembling the subcommands of each component.

teacher serve|frontend|worker and score come from the teacher, models from services.models, train and plot
from the trainer, demo, config-reference and analysis from this package (which also adds `--student`, the
analysis page, to teacher serve|frontend).

Heavy imports (torch, transformers, grpc) happen inside the commands, so `--help` stays fast.
"""

from __future__ import annotations

import typer

from services.app.analysis_cli import analysis_app, analysis_extension
from services.app.demo import register as register_demo
from services.models.commands import app as models_app
from services.teacher.commands import register_score, teacher_commands
from trainer.commands import register as register_trainer

app = typer.Typer(
    name="prefix-distill",
    help="Teacher-as-a-service for on-policy prefix distillation of language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(teacher_commands(analysis_extension()), name="teacher")
app.add_typer(analysis_app, name="analysis")
app.add_typer(models_app, name="models")
register_score(app)

register_trainer(app)
register_demo(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
