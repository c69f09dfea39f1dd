"""docker-compose.yml: valid against the compose spec and Compose v1, consistent with the repository, and every
service's command proven by running it natively (tests/compose_native.py) against a local Redis: the `models`
service copies the shipped `route` pair into the model-cache volume (and only says so the second time), the
teacher front-end and a worker come up healthy, and both trainer jobs (the default one and the `two-jobs`
profile's) complete against the one teacher. The same under a real Docker engine: tests/test_deploy_engine.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from compose_native import ROOT, interpolate, load_compose, plan_services, read_env_file

COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
SMOLLM2_ENV = ROOT / "configs" / "job-smollm2.env"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
V1_TOP_LEVEL = {"version", "services", "networks", "volumes", "secrets", "configs"}
"""The top-level keys Compose v1 (1.27-1.29) accepts besides x-*: no `name`."""


@pytest.mark.parametrize("path", [COMPOSE, GPU_OVERRIDE], ids=lambda p: p.name)
def test_compose_file_validates_against_the_compose_spec(path):
    result = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", [COMPOSE, GPU_OVERRIDE], ids=lambda p: p.name)
def test_compose_file_is_also_compose_v1(path):
    """Debian's and Ubuntu's docker-compose is v1.29: it rejects a top-level `name` (and anything else new)."""
    keys = {k for k in yaml.safe_load(path.read_text()) if not k.startswith("x-")}
    assert keys <= V1_TOP_LEVEL, keys - V1_TOP_LEVEL


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"],
        ["--env-file", "configs/job-smollm2.env"],
    ],
    ids=["default", "gpu", "smollm2"],
)
def test_compose_v1_accepts_the_files(args):
    """`docker-compose config` (v1, when installed: make docker-tools) parses and validates without an engine."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose (v1) not installed; make docker-tools installs it")
    result = subprocess.run(
        [exe, *args, "--profile", "two-jobs", "config"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(result.stdout)
    assert {"redis", "models", "teacher", "teacher-worker", "trainer", "trainer-b"} <= set(config["services"])


def test_interpolation_follows_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    assert (
        interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $SET $$SET ${SET}", env)
        == "x d d  x $SET x"
    )
    with pytest.raises(ValueError, match="NEEDED"):
        interpolate("${NEEDED:?set it}", env)


def _closure(services: dict, name: str) -> set[str]:
    """The services `docker compose up NAME` starts: NAME and its depends_on, transitively."""
    out, todo = set(), [name]
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo.extend(services[s].get("depends_on") or {})
    return out


def test_compose_structure():
    compose = load_compose(COMPOSE, {})
    services = compose["services"]
    assert {"redis", "models", "teacher", "teacher-worker", "trainer", "trainer-b"} <= set(services)
    # ports 50051 (gRPC) and 8000 (HTTP) published by the front-end
    assert services["teacher"]["ports"] == ["50051:50051", "8000:8000"]
    assert services["teacher"]["command"] == ["teacher", "frontend"]
    assert services["teacher-worker"]["command"] == ["teacher", "worker"]
    worker = services["teacher-worker"]
    assert "ports" not in worker and "container_name" not in worker, "workers must be scalable (--scale)"
    for name in ("trainer", "trainer-b"):
        deps = services[name]["depends_on"]
        assert deps["teacher"]["condition"] == "service_healthy"
        assert deps["models"]["condition"] == "service_completed_successfully"
    for name in ("teacher", "teacher-worker"):
        assert services[name]["depends_on"]["models"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        env = services[name]["environment"]
        assert env["TEACHER_REDIS_URL"] == "redis://redis:6379/0"
        assert env["TEACHER_MODEL"] == "/models/route/teacher"
        assert all(k.startswith("TEACHER_") for k in env)
    assert services["trainer-b"]["profiles"] == ["two-jobs"]
    assert "profiles" not in services["trainer"]
    assert set(compose["volumes"]) == {"model-cache", "runs"}
    # every TEACHER_* variable names a real setting
    from services.teacher.settings import TeacherSettings

    for name in ("teacher", "teacher-worker"):
        for key in services[name]["environment"]:
            assert key.removeprefix("TEACHER_").lower() in TeacherSettings.model_fields, key


def test_up_trainer_alone_starts_a_whole_teacher():
    """`docker compose up trainer` on a stack that is not running: the front-end it waits for is healthy only
    with a live worker, so starting the trainer must start a worker too (issue: it waited 198 s, then failed)."""
    services = load_compose(COMPOSE, {})["services"]
    for name in ("trainer", "trainer-b", "teacher"):
        assert {"redis", "models", "teacher", "teacher-worker"} <= _closure(services, name), name
    assert services["teacher"]["depends_on"]["teacher-worker"]["condition"] == "service_started"
    # a worker never waits for the front-end (scaling workers must not restart it)
    assert "teacher" not in _closure(services, "teacher-worker")


def test_each_scaled_worker_takes_a_bounded_number_of_threads():
    """TEACHER_TORCH_THREADS=0 would give every worker container all the host's cores (N workers, N x cores)."""
    services = load_compose(COMPOSE, {})["services"]
    threads = int(services["teacher-worker"]["environment"]["TEACHER_TORCH_THREADS"])
    assert threads >= 1
    assert (
        load_compose(COMPOSE, {"TEACHER_TORCH_THREADS": "4"})["services"]["teacher-worker"]["environment"][
            "TEACHER_TORCH_THREADS"
        ]
        == "4"
    )


def test_build_arguments_reach_both_images():
    """Every build argument of the Dockerfiles is passed through by name only (no second default in compose):
    set in the environment or .env it reaches the build, unset the Dockerfile's default holds."""
    from compose_native import dockerfile_args

    raw = yaml.safe_load(COMPOSE.read_text())
    for name, svc in load_compose(COMPOSE, {})["services"].items():
        if "build" not in svc:
            continue
        declared = set(dockerfile_args(ROOT / svc["build"]["dockerfile"]))
        assert svc["build"]["args"] == sorted(svc["build"]["args"], key=list(raw["x-build-args"]).index)
        assert set(svc["build"]["args"]) == declared, (name, declared ^ set(svc["build"]["args"]))
    assert {"BASE_IMAGE", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "CA_BUNDLE"} <= declared
    # the redis image is a variable too (a local or internal-registry image where docker.io is out of reach)
    assert raw["services"]["redis"]["image"] == "${REDIS_IMAGE:-redis:7.4-alpine}"
    assert "--protected-mode" in raw["services"]["redis"]["command"]  # any redis image, reached by its name


def test_smollm2_env_file_names_the_long_job():
    env = read_env_file(SMOLLM2_ENV)
    compose = load_compose(COMPOSE, env)
    services = compose["services"]
    assert services["models"]["command"] == ["smollm2", "/models/smollm2"]
    assert services["teacher-worker"]["environment"]["TEACHER_MODEL"].startswith("/models/smollm2/")
    for name, config in (("trainer", "job-smollm2-a.yaml"), ("trainer-b", "job-smollm2-b.yaml")):
        assert f"--config /configs/{config}" in services[name]["command"]
        assert (ROOT / "configs" / config).is_file()
        assert "--set student=/models/smollm2/" in services[name]["command"]


def test_compose_references_exist_and_configs_load():
    from trainer.config import load_config

    compose = load_compose(COMPOSE, {})
    for name, svc in compose["services"].items():
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        for spec in svc.get("volumes", []):
            source = spec.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).is_dir(), f"{name}: bind mount {source} missing"
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"demo.yaml", "job-a.yaml", "job-b.yaml"}
    for path in configs:
        cfg = load_config(path, ["student=/models/s", "teacher=grpc://teacher:50051", "output_dir=/runs/x"])
        assert cfg.prompts.startswith("builtin:"), path
    # the configs the trainer services name by default: short jobs on the task of the default pair (route)
    assert compose["services"]["models"]["command"] == ["route", "/models/route"]
    for name in ("trainer", "trainer-b"):
        config = compose["services"][name]["command"].split("--config ")[1].split()[0]
        cfg = load_config(
            ROOT / "configs" / Path(config).name, ["student=/s", "teacher=grpc://teacher:50051"]
        )
        assert cfg.prompts == "builtin:route", config
        assert cfg.steps * cfg.batch_size * cfg.samples_per_prompt <= 4000, "the default job must stay short"
        assert not cfg.freeze, "the withdrawn frozen-decoder recipe (only the output layer trains)"


# -- every service, natively -----------------------------------------------------------------------------------

TINY_TRAIN_ARGS = (
    "--set steps=2 --set batch_size=2 --set samples_per_prompt=1 --set micro_batch_size=2 "
    "--set max_new_tokens=16 --set prefix.length=8 --set prefix.start=4 --set prefix.end=16 "
    "--set warmup_steps=0 --set eval.prompts=3 --set eval.max_new_tokens=12 --set eval.every=0 "
    "--set save_every=0 --set tensorboard=false --set progress_bar=false"
)


@pytest.fixture
def local_redis(tmp_path):
    from services.teacher.redis_server import RedisProcess

    try:
        server = RedisProcess(workdir=str(tmp_path / "redis"))
    except FileNotFoundError:
        pytest.skip("no redis-server available")
    (tmp_path / "redis").mkdir(exist_ok=True)
    server.start()
    yield server
    server.stop()


def run_stack(tmp_path: Path, redis_url: str, variables: dict[str, str] | None = None) -> Path:
    """Runs models (twice), teacher, teacher-worker, trainer and trainer-b natively in compose's order, checking
    each step; returns the folder of the `runs` volume. `variables`: e.g. those of configs/job-smollm2.env."""
    from teacher_proc import env as base_env

    from services.util.net import free_port

    volumes = tmp_path / "volumes"
    variables = {
        **(variables or {}),
        "REDIS_URL": redis_url,
        "TEACHER_GRPC_PORT": str(free_port()),
        "TEACHER_HTTP_PORT": str(free_port()),
        "TRAIN_ARGS": TINY_TRAIN_ARGS,
    }
    services = plan_services(COMPOSE, variables, volumes, base_env())
    assert set(services) == {"models", "teacher", "teacher-worker", "trainer", "trainer-b"}
    pair = variables.get("MODELS", "route")
    teacher_dir = Path(services["teacher-worker"].env["TEACHER_MODEL"])
    assert teacher_dir.is_relative_to(volumes / "model-cache" / pair)
    logs = tmp_path / "logs"
    logs.mkdir()
    started = []
    try:
        # 1. the one-shot models service (depends on nothing) completes; run again (as every `up` does), it
        # only says the pair is there and leaves the files alone
        models = services["models"]
        assert models.depends_on == {}
        models.start(logs)
        started.append(models)
        assert models.wait(900) == 0, models.text()
        assert (teacher_dir / "config.json").is_file(), models.text()
        weights = next(teacher_dir.glob("*.safetensors"))
        stamp = weights.stat().st_mtime_ns
        models.start(logs)
        assert models.wait(60) == 0, models.text()
        assert "already in" in models.text(), models.text()
        assert weights.stat().st_mtime_ns == stamp

        # 2. front-end and worker (they wait for models and redis; the front-end starts with a worker);
        # healthy by their own healthchecks
        assert services["teacher"].depends_on == {
            "redis": "service_healthy",
            "models": "service_completed_successfully",
            "teacher-worker": "service_started",
        }
        assert services["teacher-worker"].depends_on == {
            "redis": "service_healthy",
            "models": "service_completed_successfully",
        }
        for name in ("teacher-worker", "teacher"):
            services[name].start(logs)
            started.append(services[name])
        services["teacher"].wait_healthy(180)
        services["teacher-worker"].wait_healthy(60)

        # 3. both jobs against the one teacher (trainer-b is the two-jobs profile), concurrently
        for name in ("trainer", "trainer-b"):
            assert services[name].depends_on == {"models": "service_completed_successfully",
                                                 "teacher": "service_healthy"}  # fmt: skip
            services[name].start(logs)
            started.append(services[name])
        probe = services["trainer"].healthy()  # the trainer image's probe: its teacher is SERVING
        assert probe.returncode == 0, probe.stdout + probe.stderr
        for name in ("trainer", "trainer-b"):
            assert services[name].wait(900) == 0, services[name].text()[-4000:]

        runs = volumes / "runs"
        jobs = (variables.get("JOB_NAME", "job-a"), variables.get("JOB_NAME_B", "job-b"))
        for job in jobs:
            assert (runs / job / "metrics.jsonl").is_file(), list(runs.iterdir())
            assert (runs / job / "final" / "config.json").is_file()
            saved = yaml.safe_load((runs / job / "config.yaml").read_text())
            assert Path(saved["student"]).is_relative_to(volumes / "model-cache" / pair)
            assert saved["teacher"] == f"grpc://127.0.0.1:{variables['TEACHER_GRPC_PORT']}"
            assert saved["steps"] == 2
        # each job ran its own config (job B's method is not job A's)
        for job, key, default in (
            (jobs[0], "TRAIN_CONFIG", "job-a.yaml"),
            (jobs[1], "TRAIN_CONFIG_B", "job-b.yaml"),
        ):
            want = yaml.safe_load((ROOT / "configs" / variables.get(key, default)).read_text())
            saved = yaml.safe_load((runs / job / "config.yaml").read_text())
            assert saved["prefix"]["schedule"] == want["prefix"]["schedule"], job
            assert saved["anchor"]["tail_fraction"] == want.get("anchor", {}).get("tail_fraction", 0.0), job
        assert "before" in services["trainer"].text() and "after" in services["trainer"].text()

        # 4. `docker compose down`: SIGTERM, clean exits
        for svc in (services["teacher"], services["teacher-worker"]):
            assert svc.stop(30) == 0, svc.text()[-3000:]
        return runs
    finally:
        for svc in reversed(started):
            svc.stop(10)


def test_every_service_runs_natively_and_both_jobs_complete(tmp_path, local_redis):
    """The default stack: the `models` service copies the shipped route pair into the model-cache volume."""
    run_stack(tmp_path, local_redis.url)


@pytest.mark.slow
@pytest.mark.smollm2
def test_every_service_runs_natively_with_smollm2(tmp_path, local_redis):
    """The long jobs' stack (configs/job-smollm2.env), their steps cut short: the `models` service converts
    SmolLM2 from its GGUF into the model-cache volume, as in a fresh deployment."""
    from services.models import smollm2

    try:
        smollm2.gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    run_stack(tmp_path, local_redis.url, read_env_file(SMOLLM2_ENV))
