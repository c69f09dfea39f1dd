"""CLI commands of the teacher: `score` (in-process, no Redis) and the `teacher` group (serve, frontend, worker)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import typer

from services.teacher.errors import InvalidRequest, TeacherError
from services.util.progress import quiet_progress_bars


@dataclass(frozen=True)
class FrontendExtension:
    """Extra flags of `teacher serve | frontend` and the HTTP routes they add: a composition root's hook (the
    teacher defines none; services/app adds the analysis page with `--student`)."""

    options: Sequence
    """Extra keyword-only `inspect.Parameter`s (typer options) of the two commands."""
    routes: Callable[[dict], Callable | None]
    """Their values -> the front-end's `http_routes` hook (services.teacher.server.HttpRoutes), or None."""


def _parse_ids(text: str | None, param: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise InvalidRequest(f"`{param}` must be comma-separated integers, got {text!r}.", param) from None


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
        prompt: str | None = typer.Option(
            None, "--prompt", help="Prompt text (tokenized without special tokens)."
        ),
        completion: str | None = typer.Option(None, "--completion", help="Completion text to score."),
        prompt_ids: str | None = typer.Option(
            None, "--prompt-ids", help="Prompt as comma-separated token ids."
        ),
        completion_ids: str | None = typer.Option(
            None, "--completion-ids", help="Completion as comma-separated ids."
        ),
        top_k: int = typer.Option(0, "--top-k", help="Most likely next tokens to list per position."),
        temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature (> 0)."),
        dtype: str = typer.Option("float32", "--dtype", help="Weights dtype: float32 | bfloat16."),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto."),
    ) -> None:
        """Score a completion in-process and print exactly the JSON body of POST /v1/logprobs."""
        from services.teacher.engine import load_engine
        from services.teacher.textapi import TokenTexts, logprobs_body, render_json, resolve_ids
        from services.teacher.types import ScoreRequest

        quiet_progress_bars()
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
        sys.stdout.write(render_json(body) + "\n")


# -- teacher serve | frontend | worker -------------------------------------------------------------------------
# The flags are generated from TeacherSettings, so each is documented once (its field) and also readable from
# the environment as TEACHER_<NAME>; a flag that is not given leaves the environment or default in charge.


def _settings(flags: dict):
    from pydantic import ValidationError

    from services.teacher.settings import TeacherSettings, redact_url

    url = flags.get("redis_url") or ""
    if redact_url(url) != url:  # given as a flag: in this process's argv, readable by every local user
        typer.echo(
            "warning: --redis-url carries a password, which every local user can read in /proc/PID/cmdline; "
            "give it as TEACHER_REDIS_URL or --redis-url-file instead.",
            err=True,
        )
    try:
        return TeacherSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        if field:
            hint = f" (flag --{field.replace('_', '-')} or TEACHER_{field.upper()})"
            typer.echo(f"error: {field}: {first['msg']}{hint}", err=True)
        else:  # a check across fields (its message names the flags)
            typer.echo(f"error: {first['msg'].removeprefix('Value error, ')}", err=True)
        raise typer.Exit(2) from None


def _make_command(
    app: typer.Typer, name: str, doc: str, runner_name: str, extension: FrontendExtension | None = None
) -> None:
    import inspect
    import logging

    from services.teacher.settings import TeacherSettings

    params = []
    for field, info in TeacherSettings.model_fields.items():
        ann = info.annotation
        base = int if ann is int else float if ann is float else str
        params.append(
            inspect.Parameter(
                field,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(
                    None,
                    f"--{field.replace('_', '-')}",
                    *(info.json_schema_extra or {}).get("flag_aliases", ()),
                    help=info.description,
                ),
                annotation=base | None,
            )
        )

    extra_names = [p.name for p in extension.options] if extension else []

    def command(**flags) -> None:
        from services.teacher import server

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        extra = {k: flags.pop(k) for k in extra_names}
        settings = _settings(flags)
        routes = extension.routes(extra) if extension else None
        runner = getattr(server, runner_name)
        if routes is None:
            runner(settings)
        else:
            runner(settings, http_routes=routes)

    command.__signature__ = inspect.Signature([*params, *(extension.options if extension else ())])
    command.__doc__ = doc
    command.__name__ = name
    app.command(name)(command)


def teacher_commands(extension: FrontendExtension | None = None) -> typer.Typer:
    """The `teacher` command group; `extension` adds flags and HTTP routes to `serve` and `frontend`."""
    app = typer.Typer(help="Run the teacher service.", no_args_is_help=True)
    _make_command(
        app, "serve", "Run a front-end (gRPC + HTTP) and --workers worker processes.", "serve", extension
    )
    _make_command(
        app,
        "frontend",
        "Run only the front-end (loads the tokenizer and config, no weights).",
        "frontend",
        extension,
    )
    _make_command(app, "worker", "Run one worker: loads the model, serves batches from Redis.", "worker")
    return app


teacher_app = teacher_commands()
