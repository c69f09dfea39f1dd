"""Who may use the teacher, against one real teacher that has it all on: bearer tokens with job-id prefixes
and quotas, TLS on gRPC and HTTP (a throwaway CA), and a Redis that needs a password. Also the token file's
parsing, and the trainer's `teacher_client.token` / `ca_file` end to end."""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
import httpx
import numpy as np
import pytest
from teacher_proc import Teacher
from tls_certs import make_certs

from services.teacher.auth import TokenTable
from services.teacher.client import TOKEN_ENV, TeacherClient
from services.teacher.errors import PermissionDenied, Unauthenticated
from services.teacher.launch import ChildProcess, child_env, free_port
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.redis_server import RedisProcess
from services.teacher.types import ScoreRequest

TOKEN_A = "tok-a-7f3e9c1d5b2a4e6f8091a2b3c4d5e6f7"  # jobs team-a/*
TOKEN_ALL = "tok-all-0a1b2c3d4e5f60718293a4b5c6d7e8f9"  # any job
TOKEN_SLOW = "tok-slow-93b1c2d3e4f5061728394a5b6c7d8e9f"  # max_pending=2, tokens_per_s=200
REDIS_PASSWORD = "redis-pw-5e6f7a8b9c0d"


@pytest.fixture(scope="module")
def secured(tiny_teacher, tmp_path_factory):
    """A `serve` teacher with tokens, TLS and a password-protected Redis; yields (teacher, certs)."""
    tmp = tmp_path_factory.mktemp("secured")
    certs = make_certs(tmp / "certs")
    tokens = tmp / "tokens.txt"
    tokens.write_text(
        f"# token  prefix  quotas\n{TOKEN_A} team-a/\n{TOKEN_ALL}\n"
        f"{TOKEN_SLOW} slow/ max_pending=2 tokens_per_s=200\n"
    )
    redis = RedisProcess(workdir=str(tmp), password=REDIS_PASSWORD).start()
    flags = {
        "auth-tokens": str(tokens),  # the short alias of --auth-tokens-file
        "tls-cert-file": str(certs.cert),
        "tls-key-file": str(certs.key),
        "retry-after-s": "0.05",
    }
    try:
        with Teacher(tiny_teacher, redis.url, tmp, flags=flags) as t:
            yield t, certs
    finally:
        redis.stop()


def req(job: str, rid: str = "r", n: int = 5) -> ScoreRequest:
    rng = np.random.default_rng(len(rid))
    return ScoreRequest(rng.integers(0, 512, n), rng.integers(0, 512, n), request_id=rid, job_id=job)


def post(t, certs, token: str | None, job: str = "team-a/x") -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    body = {"prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 5], "job_id": job}
    return httpx.post(t.http + "/v1/logprobs", json=body, headers=headers, verify=str(certs.ca), timeout=30)


def test_token_file_parsing(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# comment\n\nabc team-a/ max_pending=3\ndef tokens_per_s=10.5  # any job\n")
    defaults = {"max_pending": 0, "tokens_per_s": 0.0}
    table = TokenTable.load(path, defaults)
    a, d = table.authenticate("Bearer abc"), table.authenticate("bearer  def")
    assert (a.name, a.job_prefix, a.max_pending, a.tokens_per_s) == ("token#3", "team-a/", 3, 0.0)
    assert (d.job_prefix, d.tokens_per_s) == ("", 10.5)
    for header in (None, "", "Bearer", "Basic abc", "Bearer abcd", "Bearer ab"):
        with pytest.raises(Unauthenticated):
            table.authenticate(header)
    with pytest.raises(PermissionDenied) as ei:
        a.authorize("team-b/1")
    assert ei.value.param == "job_id"
    path.write_text("s3cret-token bogus=1\n")
    with pytest.raises(ValueError, match=r"t.txt:1: unknown option 'bogus'") as ei:
        TokenTable.load(path, defaults)
    assert "s3cret" not in str(ei.value)  # a malformed line is named by its number, never by its token
    path.write_text("same\nsame\n")
    with pytest.raises(ValueError, match="listed twice"):
        TokenTable.load(path, defaults)


def test_http_tokens_scopes_and_open_paths(secured):
    t, certs = secured
    assert post(t, certs, TOKEN_A).status_code == 200
    assert post(t, certs, TOKEN_ALL, job="anything").status_code == 200
    for token in (None, "wrong-token"):
        r = post(t, certs, token)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["param"] == "authorization"
    r = post(t, certs, TOKEN_A, job="team-b/x")
    assert r.status_code == 403 and r.json()["error"]["param"] == "job_id"
    get = {"verify": str(certs.ca), "timeout": 10}
    assert httpx.get(t.http + "/healthz", **get).status_code == 200  # open
    assert httpx.get(t.http + "/openapi.json", **get).status_code == 200  # open
    assert httpx.get(t.http + "/v1/models", **get).status_code == 401
    assert httpx.get(t.http + "/metrics", **get).status_code == 401  # metrics_need_token defaults to true
    auth = {"authorization": f"Bearer {TOKEN_ALL}"}
    assert httpx.get(t.http + "/metrics", headers=auth, **get).status_code == 200
    with pytest.raises(httpx.HTTPError):  # TLS only: plain HTTP on the port gets nothing
        httpx.get(t.http.replace("https", "http") + "/healthz", timeout=5)


def test_grpc_tokens_scopes_and_tls(secured):
    t, certs = secured

    async def go(token: str, reqs: list[ScoreRequest], **kw):
        async with TeacherClient(t.target, token=token, ca_file=str(certs.ca), retries=0, **kw) as c:
            return await c.score_many(reqs, return_exceptions=True)

    ok = asyncio.run(go(TOKEN_A, [req("team-a/1", "a"), req("team-b/1", "b"), req("team-a/2", "c")]))
    assert [type(r).__name__ for r in ok] == ["ScoreResult", "PermissionDenied", "ScoreResult"]
    assert ok[1].param == "job_id"  # in-band: the others were answered
    for token in ("", "wrong"):
        (res,) = asyncio.run(go(token, [req("team-a/1")]))
        assert isinstance(res, Unauthenticated)

    async def refused_streams(n: int) -> list:  # a refusal must not race the client's writes (grpc#36066)
        return await asyncio.gather(
            *(go("wrong", [req("team-a/1", str(i)) for i in range(32)]) for i in range(n))
        )

    outcomes = {type(r).__name__ for rs in asyncio.run(refused_streams(40)) for r in rs}
    assert outcomes == {"Unauthenticated"}

    async def unary(token: str, job: str):
        async with TeacherClient(t.target, token=token, ca_file=str(certs.ca), retries=0) as c:
            info = await c.model_info()
            return info, await c.score(req(job))

    info, res = asyncio.run(unary(TOKEN_ALL, "x"))
    assert info.vocab_size == 512 and res.token_logprobs.shape == (5,)
    with pytest.raises(PermissionDenied):
        asyncio.run(unary(TOKEN_A, "x"))
    with pytest.raises(Unauthenticated):
        asyncio.run(unary("nope", "team-a/1"))
    with grpc.insecure_channel(f"127.0.0.1:{t.grpc_port}") as ch:  # no TLS: refused by the transport
        call = ch.unary_unary("/teacher.v1.Teacher/GetModelInfo")
        with pytest.raises(grpc.RpcError) as ei:
            call(pb.ModelInfoRequest().SerializeToString(), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_quotas_push_back_with_a_hint_and_the_client_recovers(secured):
    """max_pending=2 and 200 tokens/s: a raw burst of 8 gets RESOURCE_EXHAUSTED with a retry-after hint for
    some; through the client (which honours the hint) all 8 are answered."""
    t, certs = secured
    burst = [req("slow/1", f"q{i}", n=20) for i in range(8)]

    async def raw():
        creds = grpc.ssl_channel_credentials(certs.ca.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{t.grpc_port}", creds) as ch:
            call = ch.stream_stream(
                "/teacher.v1.Teacher/ScoreStream",
                request_serializer=pb.ScoreRequest.SerializeToString,
                response_deserializer=pb.ScoreResponse.FromString,
            )(iter([r.to_pb() for r in burst]), metadata=(("authorization", f"Bearer {TOKEN_SLOW}"),))
            return [resp async for resp in call]

    answers = asyncio.run(raw())
    refused = [a for a in answers if a.HasField("error")]
    assert refused and all(a.error.code == "RESOURCE_EXHAUSTED" for a in refused)
    assert all(a.error.retry_after_ms > 0 and a.error.param == "authorization" for a in refused)

    async def client():
        async with TeacherClient(t.target, token=TOKEN_SLOW, ca_file=str(certs.ca)) as c:
            return await c.score_many(burst), c.stats

    results, stats = asyncio.run(client())
    assert len(results) == 8 and stats.retried > 0 and stats.duplicates == 0


def test_no_token_or_password_in_the_logs(secured):
    t, _ = secured
    text = t.front.text()
    assert "auth=on" in text and "tls=on" in text and ":***@" in text
    for secret in (TOKEN_A, TOKEN_ALL, TOKEN_SLOW, "wrong-token", REDIS_PASSWORD):
        assert secret not in text


def test_trainer_token_and_ca_end_to_end(secured, tiny_student, tmp_path):
    from trainer.config import load_config
    from trainer.loop import train

    t, certs = secured
    common = [
        f"student={tiny_student}",
        f"teacher={t.target}",
        f"output_dir={tmp_path / 'run'}",
        "steps=1",
        "batch_size=2",
        "max_new_tokens=8",
        "prefix.length=4",
        "eval.max_new_tokens=8",
        "eval.head_tokens=4",
        "eval.every=0",
        "progress_bar=false",
        "tensorboard=false",
        f"teacher_client.ca_file={certs.ca}",
        "teacher_client.retries=0",
    ]
    summary = train(load_config(None, [*common, f"teacher_client.token={TOKEN_ALL}"]))
    assert summary.steps == 1
    with pytest.raises(Unauthenticated):
        train(load_config(None, [*common, "teacher_client.token=bad", f"output_dir={tmp_path / 'bad'}"]))


def test_queue_over_rediss_with_a_password(tmp_path):
    """Both sides of the queue over a TLS Redis that needs a password (`rediss://:pw@host/db?ssl_ca_certs=`)."""
    import shutil
    import subprocess
    import time

    from services.teacher.queue import (
        FrontendQueue,
        QueueConfig,
        ReplyStats,
        WorkerQueue,
        decode_reply,
        encode_ok,
    )
    from services.teacher.settings import TeacherSettings
    from services.util.net import free_port

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("no redis-server on PATH")
    certs, port = make_certs(tmp_path / "certs"), free_port()
    args = [
        exe,
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    args += ["--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key)]
    args += ["--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no", "--requirepass", REDIS_PASSWORD]
    server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={certs.ca}"
    settings = TeacherSettings(model="m", redis_url=url, namespace="tls")
    cfg = QueueConfig.from_settings(settings)
    try:
        worker = WorkerQueue(url, cfg)
        end = time.monotonic() + 10
        while True:
            try:
                worker.redis.ping()
                break
            except Exception:  # noqa: BLE001 - not up yet (or built without TLS: skip below)
                if server.poll() is not None:
                    pytest.skip(f"this redis-server cannot serve TLS: {server.stdout.read()[-300:]!r}")
                assert time.monotonic() < end, "the TLS redis-server did not come up"
                time.sleep(0.1)

        async def go():
            front = FrontendQueue(url, cfg)
            try:
                assert await front.enqueue("r1", b"payload", "job", 3, cfg.key("reply:x"), 0)
                (item,) = await asyncio.to_thread(worker.claim, 100, 4)
                await asyncio.to_thread(
                    worker.complete, item, encode_ok("r1", b"answer", ReplyStats(1, 3, 0, 0))
                )
                return await front.read_replies(cfg.key("reply:x"), 5)
            finally:
                await front.close()

        (envelope,) = asyncio.run(go())
        rid, (body, _) = decode_reply(envelope)
        assert (rid, body) == ("r1", b"answer")
        assert settings.redacted_redis_url().startswith("rediss://:***@127.0.0.1")
        worker.close()
    finally:
        server.kill()
        server.wait()


def test_analysis_page_on_a_tls_teacher(tiny_teacher, tiny_student, tmp_path):
    """`prefix-distill teacher serve --student` with TLS and tokens: the page's own client reaches the front-end
    over loopback trusting its certificate, with the token of its environment; callers' scopes still apply."""
    certs = make_certs(tmp_path / "certs")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN_A} team-a/\n{TOKEN_ALL}\n")
    redis = RedisProcess(workdir=str(tmp_path)).start()
    grpc_port, http_port = free_port(), free_port()
    args = [sys.executable, "-m", "services.app", "teacher", "serve", "--model", str(tiny_teacher)]
    args += ["--redis-url", redis.url, "--workers", "1", "--student", str(tiny_student)]
    args += ["--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port)]
    args += ["--http-host", "127.0.0.1", "--http-port", str(http_port), "--auth-tokens", str(tokens)]
    args += ["--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key)]
    proc = ChildProcess(args, tmp_path / "teacher.log", env={**child_env(), TOKEN_ENV: TOKEN_ALL})
    base, tls = f"https://127.0.0.1:{http_port}", {"verify": str(certs.ca), "timeout": 60}
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.alive():
            try:
                if httpx.get(base + "/healthz", **tls).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail(f"the TLS teacher with a student did not start:\n{proc.tail()}")
        body = {"prompt_token_ids": [5, 17, 42], "completion_token_ids": [7, 8, 9], "job_id": "team-a/x"}
        auth = {"authorization": f"Bearer {TOKEN_A}"}
        r = httpx.post(base + "/v1/compare", json=body, headers=auth, **tls)
        assert r.status_code == 200, r.text
        assert [tok["token_id"] for tok in r.json()["tokens"]] == [7, 8, 9]
        r = httpx.post(base + "/v1/compare", json=body | {"job_id": "team-b/x"}, headers=auth, **tls)
        assert (
            r.status_code == 403 and r.json()["error"]["param"] == "job_id"
        )  # the caller's scope, not the page's
    finally:
        proc.stop()
        redis.stop()


def test_token_weights_default_to_one_and_are_bounded(tmp_path):
    """`weight=N` gives a tenant N claims per batching round (tests/test_queue.py); default 1, refused outside
    [1, MAX_WEIGHT] or when not an integer, naming the line."""
    from services.teacher.auth import MAX_WEIGHT

    path = tmp_path / "t.txt"
    path.write_text("heavy team-a/ weight=3\nplain team-b/\n")
    table = TokenTable.load(path, {"max_pending": 0, "tokens_per_s": 0.0})
    assert table.authenticate("Bearer heavy").weight == 3
    assert table.authenticate("Bearer plain").weight == 1
    for bad in ("0", str(MAX_WEIGHT + 1), "-1", "1.5", "two"):
        path.write_text(f"s3cret team-a/ weight={bad}\n")
        with pytest.raises(ValueError, match=r"t.txt:1: weight must be") as ei:
            TokenTable.load(path, {})
        assert "s3cret" not in str(ei.value)
