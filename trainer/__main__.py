"""`python -m trainer train|plot ...`: the trainer's own commands, so `torchrun -m trainer train ...` runs DDP.

`prefix-distill train` is the same command; this entry imports only the trainer (not the composition root).
"""

import typer

from trainer.commands import register

app = typer.Typer(name="trainer", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
register(app)

if __name__ == "__main__":
    app()
