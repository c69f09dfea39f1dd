"""docker-compose.yml: valid against the compose spec, consistent with the repository, and every service's
command proven by running it natively (tests/compose_native.py) against a local Redis with tiny models laid
out where the `models` service puts SmolLM2: the teacher front-end and a worker come up healthy, and both
trainer jobs (the default one and the `two-jobs` profile's) complete against the one teacher.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from compose_native import ROOT, interpolate, load_compose, plan_services

COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


@pytest.mark.parametrize("path", [COMPOSE, GPU_OVERRIDE], ids=lambda p: p.name)
def test_compose_file_validates_against_the_compose_spec(path):
    result = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_interpolation_follows_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    assert (
        interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $SET $$SET ${SET}", env)
        == "x d d  x $SET x"
    )
    with pytest.raises(ValueError, match="NEEDED"):
        interpolate("${NEEDED:?set it}", env)


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
        assert all(k.startswith("TEACHER_") for k in env)
    assert services["trainer-b"]["profiles"] == ["two-jobs"]
    assert "profiles" not in services["trainer"]
    assert set(compose["volumes"]) == {"model-cache", "runs"}
    # every TEACHER_* variable names a real setting
    from services.teacher.settings import TeacherSettings

    for name in ("teacher", "teacher-worker"):
        for key in services[name]["environment"]:
            assert key.removeprefix("TEACHER_").lower() in TeacherSettings.model_fields, key


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
    # the configs the trainer services name by default
    for name in ("trainer", "trainer-b"):
        config = compose["services"][name]["command"].split("--config ")[1].split()[0]
        assert (ROOT / "configs" / Path(config).name).is_file()


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


def run_stack(tmp_path: Path, redis_url: str, model_cache: Path) -> Path:
    """Runs models, teacher, teacher-worker, trainer and trainer-b natively in compose's order, checking each
    step; returns the folder of the `runs` volume."""
    from teacher_proc import env as base_env

    from services.util.net import free_port

    volumes = tmp_path / "volumes"
    variables = {
        "REDIS_URL": redis_url,
        "TEACHER_GRPC_PORT": str(free_port()),
        "TEACHER_HTTP_PORT": str(free_port()),
        "TEACHER_TORCH_THREADS": "1",
        "TRAIN_ARGS": TINY_TRAIN_ARGS,
    }
    services = plan_services(COMPOSE, variables, volumes, base_env(), {"model-cache": model_cache})
    assert set(services) == {"models", "teacher", "teacher-worker", "trainer", "trainer-b"}
    family = model_cache / "smollm2-135m-instruct"
    logs = tmp_path / "logs"
    logs.mkdir()
    started = []
    try:
        # 1. the one-shot models service (depends on nothing) completes
        models = services["models"]
        assert models.depends_on == {}
        models.start(logs)
        started.append(models)
        assert models.wait(600) == 0, models.text()
        assert f"teacher: {family / 'teacher'}" in models.text()
        assert f"student: {family / 'student-6l'}" in models.text()

        # 2. front-end and worker (they wait for models and redis); healthy by their own healthchecks
        for name in ("teacher", "teacher-worker"):
            assert services[name].depends_on == {
                "redis": "service_healthy",
                "models": "service_completed_successfully",
            }
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
            assert services[name].wait(600) == 0, services[name].text()[-4000:]

        runs = volumes / "runs"
        for job in ("job-a", "job-b"):
            assert (runs / job / "metrics.jsonl").is_file(), list(runs.iterdir())
            assert (runs / job / "final" / "config.json").is_file()
            saved = yaml.safe_load((runs / job / "config.yaml").read_text())
            assert saved["student"] == str(family / "student-6l")
            assert saved["teacher"] == f"grpc://127.0.0.1:{variables['TEACHER_GRPC_PORT']}"
            assert saved["steps"] == 2
        assert yaml.safe_load((runs / "job-b" / "config.yaml").read_text())["prefix"]["schedule"] == "linear"
        assert "before" in services["trainer"].text() and "after" in services["trainer"].text()

        # 4. `docker compose down`: SIGTERM, clean exits
        for svc in (services["teacher"], services["teacher-worker"]):
            assert svc.stop(30) == 0, svc.text()[-3000:]
        return runs
    finally:
        for svc in reversed(started):
            svc.stop(10)


def test_every_service_runs_natively_and_both_jobs_complete(
    tmp_path, tiny_teacher, tiny_student, local_redis
):
    # the model-cache volume holds tiny models where `models prepare smollm2` puts SmolLM2, so the `models`
    # service finds them cached and the default TEACHER_MODEL / STUDENT_MODEL paths lead to them
    cache = tmp_path / "model-cache"
    shutil.copytree(tiny_teacher, cache / "smollm2-135m-instruct" / "teacher")
    shutil.copytree(tiny_student, cache / "smollm2-135m-instruct" / "student-6l")
    run_stack(tmp_path, local_redis.url, cache)


@pytest.mark.slow
@pytest.mark.smollm2
def test_every_service_runs_natively_with_smollm2(tmp_path, local_redis):
    """The same with the real models: the model-cache volume is the default cache, which the `models` service
    fills on first use (as in a fresh deployment) and finds prepared afterwards."""
    from services.models import smollm2

    try:
        smollm2.gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    run_stack(tmp_path, local_redis.url, smollm2.default_cache())
