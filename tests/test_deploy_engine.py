"""`make test-compose`: docker-compose.yml under a real Docker engine, from nothing back to nothing.

Not part of `make test` (it needs root or a Docker engine, and builds two images): it runs only with
PREFIX_DISTILL_TEST_COMPOSE=1, which `make test-compose` sets. In order:
1. the service run natively (tests/compose_native.py: the compose file's own commands and variables) gives the
   reference answers of /v1/models and /v1/logprobs;
2. a Docker engine (ours if none answers, stopped at the end), base images (the public ones, else a local
   debootstrap of bookworm), a PEP 503 index of the images' wheels on https://127.0.0.1 (tests/docker_engine.py);
3. both images built through compose with that index, its CA and the base image as build arguments
   (`--network host`: the builds reach only 127.0.0.1); they share every layer up to the dependencies;
4. `up trainer` alone on nothing: redis, models, a worker and the front-end come up by themselves, the job
   (cut short) completes; the front-end is healthy, /v1/models and a /v1/logprobs answer equal the native ones
   exactly; the services run as uid 10001; a second `up` finds the models in place;
5. `--scale teacher-worker=2`, then both jobs of the `two-jobs` profile under a steady load of /v1/logprobs
   requests from the host; a worker container holding claimed requests is killed with `docker kill`: every
   request is answered (as the native service answers it) and both jobs complete;
6. `down -v`: no container, network or volume of the project is left, and the engine we started is stopped.
Timings go to stdout and to $PREFIX_DISTILL_COMPOSE_CACHE/timings.json (the README's compose section).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from compose_native import ROOT, plan_services
from docker_engine import Compose, Engine, WheelIndex, base_images, cache_dir
from tolerance import batch_tolerance

pytestmark = pytest.mark.skipif(
    os.environ.get("PREFIX_DISTILL_TEST_COMPOSE") != "1",
    reason="a real Docker engine and two image builds: run it with `make test-compose`",
)

COMPOSE = ROOT / "docker-compose.yml"
PROJECT = "pdcomposetest"
SHORT_JOB = (
    "--set steps=6 --set save_every=3 --set eval.every=0 --set eval.prompts=32 --set eval.batch_size=32 "
    "--set progress_bar=false"
)
"""The jobs of configs/job-a.yaml and job-b.yaml cut short (the full ones take minutes: README)."""
BUILT = ("teacher", "trainer")
"""One service per image: `build` of these builds both images (the other services share them)."""


def _bodies(n: int) -> list[dict]:
    """/v1/logprobs requests on the route task: prompts and valid answers of the teacher's own format (each of
    the prompt's two valid tags in turn), each answer written twice (214 of the teacher's 256 positions: batches
    heavy enough to keep a worker busy)."""
    import random

    from services.models.decisions import ROUTE

    rng = random.Random("compose-bodies")
    out = []
    for i in range(n):
        x = tuple(rng.randrange(10) for _ in range(ROUTE.n_digits))
        answer = ROUTE.answer(x, [ROUTE.valid_tags(x)[0][i % 2]])
        out.append({"prompt": ROUTE.prompt(x), "completion": f"{answer} {answer}", "top_k": 5})
    return out


def _post(url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _same_answer(got: dict, want: dict) -> bool:
    """Equal but for the model id (a path in each world) and floats within `batch_tolerance` of the position (a
    batch of other requests rounds float32 sums in another order: tests/tolerance.py); ids exactly equal."""
    if got["prompt_token_ids"] != want["prompt_token_ids"] or len(got["tokens"]) != len(want["tokens"]):
        return False
    P = len(want["prompt_token_ids"])
    for t, (g, w) in enumerate(zip(got["tokens"], want["tokens"], strict=True)):
        tol = batch_tolerance(P + t)
        if (g["token_id"], g["token"]) != (w["token_id"], w["token"]) or abs(
            g["logprob"] - w["logprob"]
        ) > tol:
            return False
        if [t["token_id"] for t in g["top"]] != [t["token_id"] for t in w["top"]]:
            return False
        if any(abs(a["logprob"] - b["logprob"]) > tol for a, b in zip(g["top"], w["top"], strict=True)):
            return False
    return True


def _wait(pred, timeout_s: float, what: str, every_s: float = 1.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


class Timings(dict):
    def __init__(self) -> None:
        super().__init__()
        self._t0 = time.monotonic()

    def mark(self, name: str, since: float) -> float:
        self[name] = round(time.monotonic() - since, 1)
        print(f"[compose-test] {name}: {self[name]} s", flush=True)
        return self[name]

    def dump(self, extra: dict) -> None:
        self["total"] = round(time.monotonic() - self._t0, 1)
        out = {"timings_s": dict(self), **extra}
        (cache_dir() / "timings.json").write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2), flush=True)


# -- 1. the reference: the same services, natively ----------------------------------------------------------


def native_reference(tmp_path: Path, bodies: list[dict]) -> tuple[dict, list[dict]]:
    """/v1/models and the /v1/logprobs answer to each body from the compose file's services run natively."""
    from teacher_proc import env as base_env

    from services.teacher.redis_server import RedisProcess
    from services.util.net import free_port

    (tmp_path / "redis").mkdir()
    with RedisProcess(workdir=str(tmp_path / "redis")) as redis:
        http = free_port()
        variables = {
            "REDIS_URL": redis.url,
            "TEACHER_GRPC_PORT": str(free_port()),
            "TEACHER_HTTP_PORT": str(http),
        }
        services = plan_services(COMPOSE, variables, tmp_path / "volumes", base_env())
        logs = tmp_path / "native-logs"
        logs.mkdir()
        started = []
        try:
            services["models"].start(logs)
            assert services["models"].wait(300) == 0, services["models"].text()
            for name in ("teacher-worker", "teacher"):
                services[name].start(logs)
                started.append(services[name])
            services["teacher"].wait_healthy(180)
            status, models = _post(f"http://127.0.0.1:{http}/v1/models")
            assert status == 200, models
            answers = []
            for body in bodies:  # one at a time: each request is a batch of one, as in the idle container
                status, answer = _post(f"http://127.0.0.1:{http}/v1/logprobs", body)
                assert status == 200, answer
                answers.append(answer)
            return models, answers
        finally:
            for svc in reversed(started):
                svc.stop(20)


# -- 5. load, and a worker killed under it ----------------------------------------------------------------------


class Load:
    """Threads posting /v1/logprobs bodies in a loop until stopped; every answer checked against the reference."""

    def __init__(self, url: str, bodies: list[dict], reference: list[dict], threads: int = 6) -> None:
        self.url, self.bodies, self.reference = url, bodies, reference
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.sent = self.answered = 0
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, seed: int) -> None:
        i = seed
        while not self.stop_flag.is_set():
            body = self.bodies[i % len(self.bodies)]
            want = self.reference[i % len(self.bodies)]
            i += len(self.threads)
            with self.lock:
                self.sent += 1
            t0 = time.monotonic()
            try:
                status, got = _post(self.url, body, timeout=180)
            except OSError as err:
                status, got = 0, {"error": str(err)}
            with self.lock:
                self.latencies.append(time.monotonic() - t0)
                if status == 200 and _same_answer(got, want):
                    self.answered += 1
                else:
                    self.failures.append(f"{status}: {str(got)[:300]}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(240)


def _inflight(compose: Compose, redis_id: str) -> set[str]:
    """Request ids claimed by some worker and not yet answered (the queue's `inflight` set)."""
    docker = compose.engine.docker
    keys = docker(
        "exec", redis_id, "redis-cli", "--scan", "--pattern", "*inflight", timeout=60
    ).stdout.split()
    out = set()
    for key in keys:
        out |= set(docker("exec", redis_id, "redis-cli", "zrange", key, "0", "-1", timeout=60).stdout.split())
    return out


class Burst:
    """`n` /v1/logprobs requests sent at once (asyncio, one thread): a backlog that keeps every worker busy for
    seconds. Each answer is checked against the reference; `answered` counts the good ones."""

    def __init__(self, url: str, bodies: list[dict], reference: list[dict], n: int = 600) -> None:
        self.url, self.bodies, self.reference, self.n = url, bodies, reference, n
        self.answered = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _one(self, client, i: int) -> None:
        body, want = self.bodies[i % len(self.bodies)], self.reference[i % len(self.bodies)]
        try:
            resp = await client.post(self.url, json=body)
            ok = resp.status_code == 200 and _same_answer(resp.json(), want)
            note = f"{resp.status_code}: {resp.text[:300]}"
        except Exception as err:  # a lost request shows up here
            ok, note = False, repr(err)
        if ok:
            self.answered += 1
        else:
            self.failures.append(note)

    async def _run(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.n)
        async with httpx.AsyncClient(timeout=240, limits=limits) as client:
            await asyncio.gather(*(self._one(client, i) for i in range(self.n)))

    def start(self) -> Burst:
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join(600)
        assert not self.thread.is_alive(), "burst still running after 600 s"


def kill_a_busy_worker(
    compose: Compose, redis_id: str, burst: Callable[[], Burst], tries: int = 3
) -> tuple[str, int, list[Burst]]:
    """`docker kill` a worker container in the middle of a burst (both workers have a backlog then); returns
    (container, requests stranded with it, the bursts). Stranded: claimed and unanswered both 4 s and 12 s after
    the kill, while the live worker answers its own batches in far less; they wait for the visibility timeout
    (30 s), then go back to the queue. Tried again with a fresh worker if a kill ever fell between batches."""
    bursts = []
    for _ in range(tries):
        victim = _running(compose, "teacher-worker")[0]
        bursts.append(burst().start())
        _wait(lambda: bursts[-1].answered >= 20, 120, "20 answers of the burst", every_s=0.02)
        compose.engine.docker("kill", victim, timeout=60)
        time.sleep(4)
        early = _inflight(compose, redis_id)
        time.sleep(8)
        stranded = len(early & _inflight(compose, redis_id))
        if stranded:
            return victim, stranded, bursts
        compose("up", "-d", "--scale", "teacher-worker=2", "teacher-worker", timeout=600)  # replace it, retry
        _wait(lambda: len(_running(compose, "teacher-worker")) == 2, 120, "2 workers again")
    raise AssertionError(f"no kill in {tries} caught a worker holding requests")


def _running(compose: Compose, service: str) -> list[str]:
    return [c for c in compose.ids(service) if compose.inspect(c)["State"]["Running"]]


def _exit_code(compose: Compose, service: str, timeout_s: float) -> int:
    (container,) = compose.ids(service)
    out = compose.engine.docker("wait", container, timeout=timeout_s).stdout.strip()
    return int(out)


def _left_over(compose: Compose) -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={PROJECT}"
    docker = compose.engine.docker
    return {
        "containers": docker("ps", "-a", "-q", "--filter", label, timeout=60).stdout.split(),
        "networks": docker("network", "ls", "-q", "--filter", label, timeout=60).stdout.split(),
        "volumes": docker("volume", "ls", "-q", "--filter", label, timeout=60).stdout.split(),
    }


# -- the test ---------------------------------------------------------------------------------------------------


@pytest.mark.timeout(5400)  # image builds from scratch on vfs take most of it (2 cores: ~6 min an image)
def test_compose_stack_under_a_real_engine(tmp_path):
    from services.util.net import free_port

    times = Timings()
    bodies = _bodies(24)
    t = time.monotonic()
    native_models, reference = native_reference(tmp_path, bodies)
    times.mark("native reference (models, teacher, worker, 24 answers)", t)

    t = time.monotonic()
    with Engine() as engine:
        times.mark("engine up" + (" (ours)" if engine.ours else " (found)"), t)
        driver = engine.docker("info", "--format", "{{.Driver}}").stdout.strip()
        index = WheelIndex()
        t = time.monotonic()
        index.fill()
        index.start()
        times.mark("wheel index ready", t)
        compose, left = None, {}
        try:
            t = time.monotonic()
            bases = base_images(engine)
            times.mark(f"base images ({bases['BASE_IMAGE']})", t)
            http, grpc_port = free_port(), free_port()
            variables = {
                **bases,
                **index.build_args(),
                "TEACHER_HTTP_PORT": str(http),
                "TEACHER_GRPC_PORT": str(grpc_port),
                "TRAIN_ARGS": SHORT_JOB,
            }
            # builds on the host's network: the index on 127.0.0.1 is all they reach
            override = tmp_path / "compose.build-host-network.yml"
            override.write_text(
                yaml.safe_dump({"services": {s: {"build": {"network": "host"}} for s in BUILT}})
            )
            compose = Compose(engine, PROJECT, [COMPOSE, override], variables)
            print(f"[compose-test] compose {compose.version}, engine storage {driver}", flush=True)
            compose("--profile", "two-jobs", "down", "-v", "--remove-orphans", timeout=300)  # from nothing
            assert not any(_left_over(compose).values()), _left_over(compose)
            run_stack(compose, engine, times, http, native_models, bodies, reference, index)
        finally:
            if compose is not None:
                t = time.monotonic()
                compose(
                    "--profile", "two-jobs", "down", "-v", "--remove-orphans", "--timeout", "20", timeout=600
                )
                times.mark("down -v", t)
                left = _left_over(compose)
            index.stop()
        assert not any(left.values()), f"left behind: {left}"
        images = {
            name: engine.docker(
                "image", "inspect", "--format", "{{.Size}}", f"prefix-distill-{name}:latest"
            ).stdout
            for name in BUILT
        }
    times.dump(
        {
            "compose": compose.version,
            "storage_driver": driver,
            "base_image": bases["BASE_IMAGE"],
            "image_size_mb": {k: round(int(v) / 1e6) for k, v in images.items()},
            "cpus": os.cpu_count(),
        }
    )


def run_stack(compose, engine, times, http, native_models, bodies, reference, index) -> None:
    base = f"http://127.0.0.1:{http}"

    # 3. both images, through the build arguments (the index over TLS, its CA, the base image)
    for service in BUILT:
        t = time.monotonic()
        compose("build", service, timeout=3600)
        times.mark(f"build {service} image", t)
    layers = {
        s: json.loads(engine.docker("image", "inspect", f"prefix-distill-{s}:latest").stdout)[0]["RootFS"][
            "Layers"
        ]
        for s in BUILT
    }
    shared = 0
    while layers["teacher"][shared] == layers["trainer"][shared]:
        shared += 1
    history = json.loads(
        "[" + ",".join(engine.docker("history", "--no-trunc", "--format", "{{json .}}",
                                     "prefix-distill-teacher:latest").stdout.split("\n")[:-1]) + "]"
    )  # fmt: skip
    torch_step = next(h for h in history if "-c constraints.txt torch" in h["CreatedBy"])
    assert torch_step["Size"] not in ("0B", "0"), torch_step
    print(
        f"[compose-test] images share {shared} layers of {len(layers['teacher'])} / {len(layers['trainer'])}"
    )
    # the teacher image has two layers of its own (the code and its install), the rest is the trainer's too
    assert shared == len(layers["teacher"]) - 2, "both images must share every layer up to the dependencies"

    # 4. `up trainer` alone, on nothing
    t = time.monotonic()
    compose("up", "-d", "trainer", timeout=900)  # returns once its dependencies are healthy and it started
    times.mark("up trainer: stack healthy, trainer started", t)
    assert _exit_code(compose, "trainer", 1200) == 0, compose("logs", "--tail", "80", "trainer").stdout
    times.mark("up trainer: short job done", t)
    logs = compose("logs", "--no-color", "trainer").stdout
    assert "final model: /runs/job-a/final" in logs, logs[-3000:]
    (teacher,) = compose.ids("teacher")
    assert compose.inspect(teacher)["State"]["Health"]["Status"] == "healthy"
    for service in ("teacher", "teacher-worker"):
        (cid,) = compose.ids(service)
        assert engine.docker("exec", cid, "id", "-u").stdout.strip() == "10001", service
    status, health = _post(f"{base}/healthz")
    assert status == 200 and health["workers"] == 1, health
    status, models = _post(f"{base}/v1/models")
    assert status == 200, models
    card, native_card = models["data"][0], native_models["data"][0]
    assert card["id"] == "/models/route/teacher"  # the model id is its folder: a path in each world
    same = {"id": None, "root": None, "created": None}  # the path, and the front-end's start time
    assert {**card, **same} == {**native_card, **same}, (card, native_card)
    status, answer = _post(f"{base}/v1/logprobs", bodies[0])  # idle: a batch of one, as natively
    assert status == 200, answer
    assert answer["model"] == "/models/route/teacher"
    assert {**answer, "model": None} == {**reference[0], "model": None}, "not the native answer, exactly"

    # a second `up` (as a user would): models only says the pair is there
    t = time.monotonic()
    compose("up", "-d", "teacher", timeout=600)
    (models_cid,) = compose.ids("models")
    assert _exit_code(compose, "models", 120) == 0
    assert "already in /models/route" in engine.docker("logs", models_cid).stdout
    times.mark("second up: models already in place", t)

    # 5. two workers, both jobs of `two-jobs`, load from the host, a busy worker killed
    t = time.monotonic()
    compose("up", "-d", "--scale", "teacher-worker=2", "teacher-worker", timeout=600)
    _wait(lambda: _post(f"{base}/healthz")[1].get("workers") == 2, 240, "2 live workers")
    times.mark("scale to 2 workers: both alive", t)
    (redis_id,) = compose.ids("redis")
    two = ["--profile", "two-jobs"]
    t = time.monotonic()
    compose.env.update({"JOB_NAME": "two-jobs-a", "JOB_NAME_B": "two-jobs-b"})  # fresh runs of both jobs
    compose(*two, "up", "-d", "--no-deps", "trainer", "trainer-b", timeout=900)
    url = f"{base}/v1/logprobs"
    with Load(url, bodies, reference) as load:
        _wait(lambda: load.answered >= 20, 300, "20 answers under load")
        victim, stranded, bursts = kill_a_busy_worker(
            compose, redis_id, lambda: Burst(url, bodies, reference)
        )
        at_kill = load.answered
        times.mark("two-jobs running; a worker holding requests killed", t)
        for b in bursts:
            b.join()
        _wait(lambda: load.answered >= at_kill + 40, 300, "40 more answers after the kill")
        codes = {s: _exit_code(compose, s, 1200) for s in ("trainer", "trainer-b")}
    times.mark("two-jobs: both short jobs done", t)
    assert codes == {"trainer": 0, "trainer-b": 0}, compose(*two, "logs", "--tail", "60").stdout[-6000:]
    assert not load.failures, load.failures[:5]
    assert load.answered == load.sent, (load.answered, load.sent)
    for b in bursts:
        assert not b.failures and b.answered == b.n, (b.answered, b.n, b.failures[:5])
    print(
        f"[compose-test] killed {victim[:12]} holding {stranded} unanswered requests (kill {len(bursts)}); "
        f"all {sum(b.n for b in bursts)} burst and {load.sent} steady requests answered as natively "
        f"(steady: slowest {max(load.latencies):.1f} s)"
    )
    for job in ("two-jobs-a", "two-jobs-b"):
        assert f"final model: /runs/{job}/final" in compose(*two, "logs", "--no-color").stdout
    # the README's way to get a run out of the volume (v1 has no `compose cp`)
    out = Path(index.folder).parent / "runs-copy"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    engine.docker("cp", f"{compose.ids('trainer')[0]}:/runs/two-jobs-a", str(out / "two-jobs-a"), timeout=300)
    assert (out / "two-jobs-a" / "final" / "config.json").is_file()
    assert (out / "two-jobs-a" / "metrics.jsonl").is_file()
    shutil.rmtree(out)
