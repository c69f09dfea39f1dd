"""Where the analysis page runs: `prefix-distill analysis serve`, `teacher serve|frontend --student`, and
`serve_analysis` (a child process, for the demo and the tests).

- `prefix-distill analysis serve --teacher grpc://HOST:PORT --student PATH [--student NAME=PATH ...]`: its own
  HTTP app (the page at /ui, /v1/compare, /v1/rescue, /v1/analysis, /healthz) over a running teacher.
- `prefix-distill teacher serve ... --student PATH`: the same routes on the teacher's HTTP front-end, added
  through the front-end's extra-routes hook (`analysis_extension`); they reach the teacher through its own gRPC
  port, as any client does. Without `--student` the teacher serves no page.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import typer

from services.teacher.commands import FrontendExtension

analysis_app = typer.Typer(help="Token-level analysis of a student against the teacher (page at /ui).")
STUDENT_HELP = "A student to analyse: a model folder or hub id, or NAME=PATH (repeatable)."


def _build(teacher_target: str, students: Sequence[str], device: str = "cpu", ca_file: str = ""):
    """The service over `teacher_target`; its client's token comes from $PREFIX_DISTILL_TEACHER_TOKEN."""
    from services.app.analysis_service import AnalysisService, load_students
    from services.teacher.client import ClientOptions

    return AnalysisService(
        teacher_target, load_students(students, device), ClientOptions(retries=2, ca_file=ca_file)
    )


def analysis_routes(students: Sequence[str], device: str = "cpu"):
    """The front-end's `http_routes` hook serving the analysis of `students` (None without students)."""
    if not students:
        return None

    def routes(grpc_target: str, ca_file: str) -> list:
        from services.app.analysis_api import analysis_router

        router = analysis_router(_build(grpc_target, students, device, ca_file))
        print(f"analysis page at /ui of the HTTP front-end; students: {', '.join(students)}", flush=True)
        return [router]

    return routes


def analysis_extension() -> FrontendExtension:
    """`--student` on `teacher serve | frontend`: the analysis page at /ui of the teacher's HTTP front-end."""
    option = inspect.Parameter(
        "student",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(None, "--student", help=STUDENT_HELP + " Serves the analysis page at /ui."),
        annotation=list[str] | None,
    )
    return FrontendExtension(options=[option], routes=lambda flags: analysis_routes(flags["student"] or []))


@analysis_app.command("serve")
def serve(
    teacher: str = typer.Option(..., "--teacher", help="The teacher's gRPC address, grpc://HOST:PORT."),
    student: list[str] = typer.Option(..., "--student", help=STUDENT_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="HTTP bind address."),
    port: int = typer.Option(8001, "--port", help="HTTP port (0: a free one)."),
    device: str = typer.Option("cpu", "--device", help="Device of the students: cpu | cuda | cuda:N."),
    ca_file: str = typer.Option(
        "", "--teacher-ca-file", help="CA of the teacher's TLS certificate (TLS on)."
    ),
) -> None:
    """Serve the analysis page (/ui) and API (/v1/compare, /v1/rescue) over a running teacher."""
    import uvicorn

    from services.app.analysis_api import create_analysis_app
    from services.util.net import free_port

    try:
        service = _build(teacher, student, device, ca_file)
    except OSError as err:
        typer.echo(f"error: student: {err}", err=True)
        raise typer.Exit(2) from None
    port = port or free_port()
    print(
        f"analysis ready: http://{host}:{port}/ui teacher={teacher} students={','.join(service.students)}",
        flush=True,
    )
    uvicorn.run(create_analysis_app(service), host=host, port=port, log_level="warning", access_log=False)


@dataclass
class AnalysisServer:
    """A running `analysis serve` child process."""

    url: str
    """The page, http://HOST:PORT/ui."""
    base: str
    """The API root, http://HOST:PORT."""
    process: object

    def stop(self) -> None:
        self.process.stop()


def serve_analysis(
    teacher_target: str,
    students: Sequence[str | Path],
    port: int = 0,
    *,
    log: Path | None = None,
    timeout_s: float = 120.0,
) -> AnalysisServer:
    """Starts `prefix-distill analysis serve` on 127.0.0.1:`port` (0: a free one) as a child process and waits
    until it answers; returns its page address and a `stop()`. For the demo: print `.url`, `.stop()` at the end."""
    import tempfile

    import httpx

    from services.teacher.launch import ChildProcess
    from services.util.net import free_port

    port = port or free_port()
    log = Path(log) if log else Path(tempfile.mkstemp(prefix="analysis-", suffix=".log")[1])
    args = [sys.executable, "-m", "services.app", "analysis", "serve", "--teacher", teacher_target]
    args += [a for s in students for a in ("--student", str(s))] + ["--port", str(port)]
    proc = ChildProcess(args, log)
    base = f"http://127.0.0.1:{port}"
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if not proc.alive():
            proc.stop()
            raise RuntimeError(f"analysis serve exited with {proc.p.returncode}:\n{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return AnalysisServer(base + "/ui", base, proc)
        time.sleep(0.2)
    proc.stop()
    raise TimeoutError(f"analysis serve did not answer within {timeout_s:.0f} s:\n{proc.tail()}")
