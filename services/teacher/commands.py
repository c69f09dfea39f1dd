"""CLI commands of the teacher: `score` (in-process, no Redis) and the `teacher` group (serve, frontend, worker)."""

from __future__ import annotations

import json
import sys

import typer

from services.teacher.errors import TeacherError

teacher_app = typer.Typer(help="Run the teacher service.", no_args_is_help=True)


def _parse_ids(text: str | None, param: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise TeacherError(f"`{param}` must be comma-separated integers, got {text!r}.", param) from None


def fail(err: TeacherError | ValueError, param: str = "") -> None:
    """One-line error on stderr naming the field, exit code 2."""
    param = getattr(err, "param", "") or param
    msg = getattr(err, "message", None) or str(err)
    typer.echo(f"error: {param + ': ' if param else ''}{msg}", err=True)
    raise typer.Exit(2)


def register_score(app: typer.Typer) -> None:
    @app.command()
    def score(
        model: str = typer.Option(..., "--model", help="Model folder or hub id."),
        prompt: str | None = typer.Option(None, "--prompt", help="Prompt text (tokenized without special tokens)."),
        completion: str | None = typer.Option(None, "--completion", help="Completion text to score."),
        prompt_ids: str | None = typer.Option(None, "--prompt-ids", help="Prompt as comma-separated token ids."),
        completion_ids: str | None = typer.Option(None, "--completion-ids", help="Completion as comma-separated ids."),
        top_k: int = typer.Option(0, "--top-k", help="Most likely next tokens to list per position."),
        temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature (> 0)."),
        dtype: str = typer.Option("float32", "--dtype", help="Weights dtype: float32 | bfloat16."),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto."),
    ) -> None:
        """Score a completion in-process and print exactly the JSON body of POST /v1/logprobs."""
        from services.teacher.engine import load_engine
        from services.teacher.textapi import TokenTexts, logprobs_body, resolve_ids
        from services.teacher.types import ScoreRequest

        try:
            p_ids = _parse_ids(prompt_ids, "prompt_token_ids")
            c_ids = _parse_ids(completion_ids, "completion_token_ids")
            engine = load_engine(model, dtype=dtype, device=device)
            p, c = resolve_ids(engine.tokenizer, prompt, p_ids, completion, c_ids)
            req = ScoreRequest(p, c, request_id="cli", top_k=top_k, temperature=temperature)
            result = engine.score_one(req)
        except (TeacherError, ValueError) as err:
            fail(err)
        except OSError as err:
            fail(err, "model")
        body = logprobs_body(engine.info.model_id, TokenTexts(engine.tokenizer), p, c, result)
        sys.stdout.write(json.dumps(body) + "\n")
