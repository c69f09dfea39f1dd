"""One tenant against another, and the numeric edge inputs a hostile client found (issue 27), against one real
teacher: `serve` with two tenants' tokens and the analysis routes (`--student`), the real Redis, HTTP and gRPC
over loopback. Every bad value must get a 4xx (INVALID_ARGUMENT) naming its field, never a 500, a NaN or a
silent change; nothing one tenant sends may be visible to the other."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import httpx
import numpy as np
import pytest
from teacher_proc import Teacher

from services.teacher import launch
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.redis_server import RedisProcess

TOKEN_A = "tok-a-0f1e2d3c4b5a69788796a5b4c3d2e1f0"  # jobs team-a/*
TOKEN_B = "tok-b-1a2b3c4d5e6f708192a3b4c5d6e7f801"  # jobs team-b/*
NAMESPACE = "tenants27"
TOKEN_BYTES = "tok-bytes-3c4d5e6f708192a3b4c5d6e7f8091a2b"  # jobs team-m/*, max_queued_bytes=3000
TOKEN_SLOW = "tok-slow-27aa0b1c2d3e4f5061728394a5b6c7d8"  # jobs team-s/*, max_pending=2
TOKEN_SVC = "tok-svc-9f8e7d6c5b4a39281706f5e4d3c2b1a0"  # the analysis routes' own client (any job)
TOKEN_HASH = "tok#with-a-hash-0123456789abcdef01"  # jobs team-h/*: a `#` inside a token is part of it


@pytest.fixture(scope="module")
def teacher(tiny_teacher, tiny_student, redis_url, tmp_path_factory):
    """`prefix-distill teacher serve` through the composition root (services.app), which adds `--student`."""
    tmp = tmp_path_factory.mktemp("tenants")
    tokens = tmp / "tokens.txt"
    tokens.write_text(
        f"# token  prefix\n{TOKEN_A} team-a/ job=team-a/http\n{TOKEN_B} team-b/ job=team-b/http  # team B\n"
        f"{TOKEN_HASH} team-h/\n{TOKEN_SVC}\n{TOKEN_SLOW} team-s/ max_pending=2\n"
        f"{TOKEN_BYTES} team-m/ max_queued_bytes=3000\n"
    )
    flags = {
        "auth-tokens": str(tokens),
        "student": str(tiny_student),
        "max-request-mb": "1",
        "namespace": NAMESPACE,
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFIX_DISTILL_TEACHER_TOKEN", TOKEN_SVC)
        mp.setattr(launch, "CLI", [sys.executable, "-m", "services.app", "teacher"])
        with Teacher(tiny_teacher, redis_url, tmp, flags=flags) as t:
            yield t


def post(teacher, path: str, body, token: str = TOKEN_A) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
    return httpx.post(teacher.http + path, content=content, headers=headers, timeout=120)


def assert_refused(r: httpx.Response, param: str) -> None:
    assert r.status_code in (400, 422), (r.status_code, r.text[:400])
    err = r.json()["error"]
    assert err["param"].split("[")[0].split(".")[0] == param, err


LOGPROBS = {"prompt_token_ids": [5, 6, 7], "completion_token_ids": [8, 9], "job_id": "team-a/x"}


# -- 4. numeric edge values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [2**63, 2**63 + 5, 2**64 - 1, 2**31, 2**64])
@pytest.mark.parametrize("field", ["prompt_token_ids", "completion_token_ids"])
def test_huge_token_ids_are_refused_naming_the_field(teacher, field, value):
    r = post(teacher, "/v1/logprobs", {**LOGPROBS, field: [5, value]})
    assert_refused(r, field)
    assert "-1" not in r.json()["error"]["message"]  # no wrapped value


@pytest.mark.parametrize("value", [1e-40, 1.4e-45, 1e-320, 1e-7, 1e39, "NaN", "Infinity"])
def test_temperatures_float32_cannot_compute_are_refused(teacher, value):
    body = json.dumps({**LOGPROBS, "temperature": 0.5}).replace("0.5", str(value))
    r = post(teacher, "/v1/logprobs", body)
    assert_refused(r, "temperature")


def test_the_smallest_accepted_temperature_gives_finite_logprobs(teacher):
    r = post(teacher, "/v1/logprobs", {**LOGPROBS, "temperature": 1e-6, "top_k": 3})
    assert r.status_code == 200, r.text
    assert all(np.isfinite(t["logprob"]) for t in r.json()["tokens"])


@pytest.mark.parametrize("value", [1e-40, 1.4e-45, 1e39, 1e-320, 0.0])
def test_grpc_temperatures_float32_cannot_compute_are_refused(teacher, value):
    """1e-320 is 0 in float32, and 0 was proto3's "unset": it was scored at T = 1. The field has presence now, so
    a temperature set to anything float32 cannot compute is refused; one left unset is the default."""
    m = pb.ScoreRequest(
        job_id="team-a/g", prompt_token_ids=[5, 6], completion_token_ids=[7], temperature=value
    )
    with grpc.insecure_channel(f"127.0.0.1:{teacher.grpc_port}") as ch:
        score = ch.unary_unary(
            "/teacher.v1.Teacher/Score",
            request_serializer=pb.ScoreRequest.SerializeToString,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            score(m, metadata=[("authorization", f"Bearer {TOKEN_A}")], timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "temperature" in err.value.details()


@pytest.mark.parametrize("value", [1e-40, 1e-320, "NaN"])
def test_vllm_dialect_temperatures_are_refused(teacher, value):
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 2, "temperature": 0.5})
    r = post(teacher, "/v1/completions", body.replace("0.5", str(value)))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "temperature"


COMPARE = {"prompt_token_ids": [5, 6, 7], "completion_token_ids": [8, 9], "job_id": "team-a/cmp"}


def test_deep_json_on_compare_is_a_400(teacher):
    r = post(teacher, "/v1/compare", "[" * 100_000 + "]" * 100_000)
    assert r.status_code in (400, 422), (r.status_code, r.text[:300])
    assert r.json()["error"]["param"] == "body"


@pytest.mark.parametrize("seed", [2**64, 2**63, -1])
def test_generate_seed_out_of_range_is_refused(teacher, seed):
    body = {"prompt_token_ids": [5, 6], "generate": {"max_tokens": 2, "seed": seed}, "job_id": "team-a/cmp"}
    assert_refused(post(teacher, "/v1/compare", body), "generate")


@pytest.mark.parametrize("path", ["/v1/compare", "/v1/rescue"])
def test_lone_surrogates_in_prompts_are_refused(teacher, path):
    if path == "/v1/compare":
        body = '{"prompts": ["ok", "\\ud800x"], "max_new_tokens": 2, "job_id": "team-a/cmp"}'
    else:
        body = '{"prompts": [{"prompt": "\\udfff", "answer": "1"}], "lengths": [0], "job_id": "team-a/cmp"}'
    r = post(teacher, path, body)
    assert_refused(r, "prompts")
    assert "surrogate" in r.json()["error"]["message"]


LOOSE = [
    ({"top_k": "3"}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_k": 3.0}, "top_k"),
    ({"prompt_token_ids": ["1"]}, "prompt_token_ids"),
    ({"completion_token_ids": [True]}, "completion_token_ids"),
    ({"prompt_token_ids": [2**63]}, "prompt_token_ids"),
]


@pytest.mark.parametrize(("change", "param"), LOOSE, ids=[str(c) for c, _ in LOOSE])
def test_compare_is_as_strict_as_logprobs(teacher, change, param):
    assert_refused(post(teacher, "/v1/compare", {**COMPARE, **change}), param)
    assert_refused(post(teacher, "/v1/logprobs", {**LOGPROBS, **change}), param)


def test_generate_nan_temperature_names_the_field_as_not_finite(teacher):
    body = (
        '{"prompt_token_ids": [5], "generate": {"max_tokens": 2, "temperature": NaN}, "job_id": "team-a/c"}'
    )
    r = post(teacher, "/v1/compare", body)
    assert_refused(r, "generate")
    assert "finite" in r.json()["error"]["message"]


def test_the_service_is_healthy_after_the_edge_values(teacher):
    assert httpx.get(teacher.http + "/healthz", timeout=10).status_code == 200
    r = post(teacher, "/v1/logprobs", {**LOGPROBS, "top_k": 2})
    assert r.status_code == 200
    assert "Traceback" not in teacher.front.text()


# -- 3. nothing of one tenant is visible to another ------------------------------------------------------------


def grpc_score(teacher, m: pb.ScoreRequest | bytes, token: str) -> pb.ScoreResponse:
    """One Score call with raw request bytes (no client-side checks)."""
    raw = m if isinstance(m, bytes) else m.SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{teacher.grpc_port}") as ch:
        score = ch.unary_unary(
            "/teacher.v1.Teacher/Score", request_serializer=None, response_deserializer=None
        )
        out = score(raw, metadata=[("authorization", f"Bearer {token}")], timeout=60)
    return pb.ScoreResponse.FromString(out)


def test_the_prompt_cache_is_no_membership_oracle_between_tenants(teacher):
    """B's prompt, sent again by B, is reused (the cache works); the same prompt from A reports no reuse."""
    prompt = [int(x) for x in np.random.default_rng(27).integers(3, 500, 15)]

    def send(token: str, job: str, completion: int) -> int:
        m = pb.ScoreRequest(job_id=job, prompt_token_ids=prompt, completion_token_ids=[completion, 9])
        return grpc_score(teacher, m, token).prompt_tokens_reused

    assert send(TOKEN_B, "team-b/p", 8) == 0
    assert send(TOKEN_B, "team-b/p", 11) == len(prompt)  # B's own entry
    assert send(TOKEN_A, "team-a/p", 12) == 0  # A learns nothing of what B sent
    # nor by naming B's scope (token#3, B's line) itself: the front-end sets the scope
    prompt = [int(x) for x in np.random.default_rng(28).integers(3, 500, 15)]
    assert send(TOKEN_B, "team-b/p", 8) == 0
    spoof = pb.ScoreRequest(
        job_id="team-a/p", prompt_token_ids=prompt, completion_token_ids=[13], cache_scope="token#3"
    )
    assert grpc_score(teacher, spoof, TOKEN_A).prompt_tokens_reused == 0


def test_a_hash_inside_a_token_is_part_of_it(teacher):
    r = post(teacher, "/v1/logprobs", {**LOGPROBS, "job_id": "team-h/x"}, token=TOKEN_HASH)
    assert r.status_code == 200, r.text
    assert post(teacher, "/v1/logprobs", {**LOGPROBS, "job_id": "team-h/x"}, token="tok").status_code == 401


# -- 1. one tenant must not exhaust what all share -------------------------------------------------------------


def test_unknown_protobuf_fields_are_not_queued(teacher):
    """A valid request padded with a 600 kB unknown field: what reaches Redis is the re-encoded request (tens of
    bytes), seen by MONITOR on this teacher's own keys."""
    base = pb.ScoreRequest(job_id="team-a/pad", prompt_token_ids=[5, 6, 7], completion_token_ids=[8])
    pad = b"\xa2\x3e" + _varint(600_000) + b"x" * 600_000  # field 1000, length-delimited
    red = teacher.redis()
    seen: list[int] = []
    with red.monitor() as mon:
        import threading

        def watch():
            for cmd in mon.listen():
                if NAMESPACE in cmd["command"]:
                    seen.append(len(cmd["command"]))
                if "stop-watching" in cmd["command"]:
                    return

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        for _ in range(3):
            out = grpc_score(teacher, base.SerializeToString() + pad, TOKEN_A)
            assert len(out.token_logprobs.data) == 4
        red.get("stop-watching")
        t.join(30)
    print(f"largest command on this teacher's keys: {max(seen, default=0)} characters")
    assert seen and max(seen) < 20_000, (len(seen), max(seen, default=0))


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out += bytes([(n & 0x7F) | 0x80])
        n >>= 7
    return out + bytes([n])


def test_metrics_show_a_tenant_only_its_own_job_labels(teacher):
    """B floods a job named like a secret; while it is queued, B's /metrics shows it, A's shows only `_other`."""
    import asyncio

    secret = "team-b/secret-project-x"
    rng = np.random.default_rng(5)

    async def run() -> tuple[set, set]:
        seen_a, seen_b = set(), set()
        hb = {"authorization": f"Bearer {TOKEN_B}"}
        async with httpx.AsyncClient(base_url=teacher.http, timeout=120) as c:

            async def flood():
                async def one():
                    body = {
                        "prompt_token_ids": rng.integers(3, 500, 120).tolist(),
                        "completion_token_ids": rng.integers(3, 500, 60).tolist(),
                        "top_k": 5,
                        "job_id": secret,
                    }
                    await c.post("/v1/logprobs", json=body, headers=hb)

                # The gauge is refreshed by the front-end's periodic probe: on a quiet machine 300 requests can
                # drain between two refreshes, so B keeps flooding until its own scrape has seen the job (or 60 s).
                deadline = time.monotonic() + 60
                while secret not in seen_b and time.monotonic() < deadline:
                    await asyncio.gather(*(one() for _ in range(300)))
                flooding.clear()

            flooding = asyncio.Event()
            flooding.set()

            async def scrape():
                while flooding.is_set():
                    for token, seen in ((TOKEN_A, seen_a), (TOKEN_B, seen_b)):
                        r = await c.get("/metrics", headers={"authorization": f"Bearer {token}"})
                        seen |= {
                            line.split('job="')[1].split('"')[0]
                            for line in r.text.splitlines()
                            if line.startswith("teacher_queue_depth{")
                        }
                    await asyncio.sleep(0.1)

            await asyncio.gather(flood(), scrape())
        return seen_a, seen_b

    seen_a, seen_b = asyncio.run(run())
    assert secret in seen_b, seen_b  # the flood was queued while scraped
    assert secret not in seen_a and seen_a <= {"_other"}, seen_a


def test_redis_passwords_never_reach_a_log_or_argv(tiny_teacher, tmp_path):
    """`?password=` on the command line: redacted on the ready line, with a warning; a URL file keeps it out of
    /proc/PID/cmdline altogether."""
    password = "pw-27-" + "c0ffee" * 4
    redis = RedisProcess(workdir=str(tmp_path), password=password).start()
    try:
        port = urlsplit(redis.url).port
        url = f"redis://127.0.0.1:{port}/0?password={password}"
        with Teacher(tiny_teacher, url, tmp_path) as t:
            log = t.front.text()
        assert "password=***" in log and "warning: --redis-url carries a password" in log
        assert password not in log
        url_file = tmp_path / "redis-url"
        url_file.write_text(f"redis://:{password}@127.0.0.1:{port}/0\n")
        url_file.chmod(0o600)
        with Teacher(
            tiny_teacher, "redis://127.0.0.1:1/0", tmp_path, flags={"redis-url-file": str(url_file)}
        ) as t:
            cmdline = open(f"/proc/{t.front.p.pid}/cmdline", "rb").read().decode()  # noqa: SIM115
            log = t.front.text()
        assert password not in cmdline and password not in log and ":***@" in log
    finally:
        redis.stop()


def _peak_rss_mb(teacher) -> float:
    """VmHWM (peak resident memory) of the front-end process, in MB."""
    status = open(f"/proc/{teacher.front.p.pid}/status").read()  # noqa: SIM115
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1]) / 1024


def test_a_chunked_body_is_stopped_at_the_limit(teacher):
    """No Content-Length: the bytes are counted as they arrive; at --max-request-mb (1 here) the front-end answers
    413 instead of reading (and holding) the whole body."""
    sent = 0

    def body():
        nonlocal sent
        yield b'{"prompt": "'
        for _ in range(200):  # 20 MB if read in full
            sent += 100_000
            yield b"a" * 100_000

    headers = {"authorization": f"Bearer {TOKEN_A}", "content-type": "application/json"}
    answered, peak0 = [], _peak_rss_mb(teacher)
    for path in ("/v1/logprobs", "/v1/compare", "/v1/completions"):
        sent = 0
        try:
            r = httpx.post(teacher.http + path, content=body(), headers=headers, timeout=60)
        except httpx.HTTPError:  # the server may close the connection while the client still writes
            answered.append((path, "closed", sent))
            continue
        answered.append((path, r.status_code, sent))
        assert r.status_code == 413, (path, r.status_code, r.text[:200])
        assert r.json()["error"]["param"] == "body"
    grown = _peak_rss_mb(teacher) - peak0
    print(answered, f"front-end peak RSS grew {grown:.1f} MB")
    assert grown < 15, grown  # a 20 MB body read in full (and parsed) grows it by several times that
    assert httpx.get(teacher.http + "/healthz", timeout=10).status_code == 200


def test_compare_counts_against_the_callers_quota(teacher):
    """A token with max_pending=2: 20 concurrent /v1/compare calls are refused like 20 /v1/logprobs calls (429),
    instead of all running on the analysis' own token."""
    import asyncio

    async def burst(path: str, body: dict) -> list[int]:
        headers = {"authorization": f"Bearer {TOKEN_SLOW}"}
        async with httpx.AsyncClient(base_url=teacher.http, timeout=120) as c:
            rs = await asyncio.gather(*(c.post(path, json=body, headers=headers) for _ in range(20)))
        return [r.status_code for r in rs]

    compare = {"prompts": ["a b c d"] * 4, "max_new_tokens": 8, "job_id": "team-s/cmp"}
    codes = asyncio.run(burst("/v1/compare", compare))
    print("compare", sorted(codes))
    assert set(codes) <= {200, 429} and codes.count(429) >= 10, codes
    assert codes.count(200) >= 1


def test_a_tenant_is_bounded_in_bytes_held_across_all_its_jobs(teacher):
    """max_queued_bytes=3000: one ~1 kB request passes; 20 at once, each under its own job id, are mostly
    refused (429 naming the quota) instead of being queued without bound."""
    import asyncio

    rng = np.random.default_rng(3)

    def body(job: str) -> dict:
        return {
            "prompt_token_ids": rng.integers(200, 500, 200).tolist(),
            "completion_token_ids": rng.integers(200, 500, 100).tolist(),
            "job_id": job,
        }

    assert post(teacher, "/v1/logprobs", body("team-m/one"), token=TOKEN_BYTES).status_code == 200

    async def burst() -> list[httpx.Response]:
        headers = {"authorization": f"Bearer {TOKEN_BYTES}"}
        async with httpx.AsyncClient(base_url=teacher.http, timeout=120) as c:
            return await asyncio.gather(
                *(c.post("/v1/logprobs", json=body(f"team-m/j{i}"), headers=headers) for i in range(20))
            )

    rs = asyncio.run(burst())
    codes = [r.status_code for r in rs]
    print("bytes", sorted(codes))
    assert set(codes) <= {200, 429} and codes.count(429) >= 10, codes
    assert any("max_queued_bytes" in r.json()["error"]["message"] for r in rs if r.status_code == 429)


# -- 5. processes ----------------------------------------------------------------------------------------------


def _spawned_pids(pid: int) -> list[int]:
    """The processes `teacher serve` (pid) spawned with multiprocessing (its workers and the HTTP body screen,
    not its resource tracker)."""
    out = []
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():  # noqa: SIM115
        cmd = open(f"/proc/{child}/cmdline", "rb").read()  # noqa: SIM115
        if b"spawn_main" in cmd:
            out.append(int(child))
    return out


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]  # noqa: SIM115
    except FileNotFoundError:
        return False
    return state != "Z"


def test_workers_die_with_their_supervisor(tiny_teacher, redis_url, tmp_path):
    """kill -9 of `teacher serve`: its worker (nor the HTTP body screen's child) does not stay behind
    unsupervised (the worker used to, and a restarted teacher then reported 2 workers)."""
    import os
    import signal
    import time

    with Teacher(tiny_teacher, redis_url, tmp_path, flags={"namespace": "pdeath27"}) as t:
        workers = _spawned_pids(t.front.p.pid)
        assert len(workers) == 2, workers  # one worker, one body screen
        os.kill(t.front.p.pid, signal.SIGKILL)
        end = time.monotonic() + 20
        while time.monotonic() < end and any(_alive(w) for w in workers):
            time.sleep(0.2)
        left = [w for w in workers if _alive(w)]
        for w in left:
            os.kill(w, signal.SIGKILL)  # leave nothing behind, whatever the outcome
        assert not left, f"the worker outlived its supervisor; its log:\n{t.front.log.read_text()[-3000:]}"


ORPHAN = """
import logging, os, signal, sys, time
from services.teacher.worker import die_with_parent
logging.basicConfig(level=logging.INFO)
signal.signal(signal.SIGTERM, lambda *_: None)  # a graceful stop that never ends
die_with_parent(os.getppid(), grace_s=1.0)
print("ready", flush=True)
time.sleep(60)
"""


def test_an_orphan_whose_graceful_stop_hangs_still_exits(tmp_path):
    """The parent-death watch's deadline: a child that ignores SIGTERM, its parent killed -9, is gone within
    the grace period (and says why), instead of lingering unsupervised."""
    import os
    import signal
    import subprocess
    import sys
    import time

    err = tmp_path / "orphan.log"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {ORPHAN!r}],"
            f" stderr=open({str(err)!r}, 'w'), stdout=subprocess.PIPE); print(p.pid, flush=True); p.stdout.readline();"
            " print('up', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "up"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    end = time.monotonic() + 15
    while time.monotonic() < end and _alive(child):
        time.sleep(0.1)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the orphan ignored SIGTERM and outlived its deadline"
    assert "exiting now" in err.read_text()
