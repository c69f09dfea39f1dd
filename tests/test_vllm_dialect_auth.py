"""The vLLM dialect with tokens on: stock clients' credentials (Bearer, or Basic from a URL as TRL sends them), the
job each call runs under, job-id prefixes enforced, quotas, and two jobs batched fairly. Real service and Redis."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from teacher_proc import Teacher

A, B, C, SLOW = (
    "tok-a-0123456789abcdef",
    "tok-b-0123456789abcdef",
    "tok-c-0123456789abcdef",
    "tok-s-0123456789ab",
)
BODY = {"prompt": [5, 6, 7, 8], "max_tokens": 1, "prompt_logprobs": 2}


@pytest.fixture(scope="module")
def teacher(tiny_teacher, redis_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dialect-auth")
    tokens = tmp / "tokens.txt"
    tokens.write_text(f"{A} team-a/ job=team-a/trl-1\n{B} team-b/\n{C}\n{SLOW} team-s/ tokens_per_s=20\n")
    with Teacher(tiny_teacher, redis_url, tmp, flags={"auth-tokens": str(tokens)}) as t:
        yield t


def post(teacher, body=BODY, **kw) -> httpx.Response:
    return httpx.post(teacher.http + "/v1/completions", json=body, timeout=60, **kw)


def bearer(token: str, **headers) -> dict:
    return {"headers": {"authorization": f"Bearer {token}", **headers}}


def test_credentials(teacher):
    assert httpx.get(teacher.http + "/health").status_code == 200  # open: TRL's probe sends no credentials
    r = post(teacher)
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert r.json()["error"]["code"] == 401 and r.json()["error"]["param"] == "authorization"
    assert post(teacher, **bearer("nope")).status_code == 401
    assert post(teacher, **bearer(A)).status_code == 200
    host = teacher.http.removeprefix("http://")
    assert httpx.post(f"http://job:{A}@{host}/v1/completions", json=BODY, timeout=60).status_code == 200
    assert httpx.get(f"http://job:{B}@{host}/v1/models", timeout=10).status_code == 200


def test_job_identity_and_prefixes(teacher):
    denied = post(teacher, **bearer(B, **{"x-job-id": "team-a/x"}))
    assert denied.status_code == 403 and denied.json()["error"]["param"] == "job_id"
    assert denied.json()["error"]["type"] == "PermissionDeniedError"
    assert post(teacher, **bearer(B, **{"x-job-id": "team-b/x"})).status_code == 200
    assert post(teacher, {**BODY, "user": "team-b/user-1"}, **bearer(B)).status_code == 200
    assert post(teacher, {**BODY, "user": "someone"}, **bearer(B)).status_code == 403
    assert post(teacher, **bearer(B)).status_code == 200  # no job named: team-b/vllm
    assert post(teacher, {**BODY, "user": "elsewhere"}, **bearer(A)).status_code == 200  # the token's own job
    bad = post(teacher, **bearer(C, **{"x-job-id": "a b"}))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Job-Id"


def test_quota_is_a_429_in_the_envelope(teacher):
    body = {**BODY, "prompt": [5] * 30}
    codes = [post(teacher, body, **bearer(SLOW)) for _ in range(3)]
    refused = [r for r in codes if r.status_code == 429]
    assert refused and refused[0].json()["error"]["type"] == "RateLimitError"
    assert int(refused[0].headers["retry-after"]) >= 1


def test_two_jobs_are_batched_fairly(teacher):
    """Job A floods the teacher with 160 calls; job B's 4 calls, sent after, finish before most of A's."""
    rng = np.random.default_rng(0)
    flood = [rng.integers(3, 500, 200).tolist() for _ in range(160)]
    few = [rng.integers(3, 500, 200).tolist() for _ in range(4)]

    async def run():
        done: dict[str, list[float]] = {"a": [], "b": []}
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as c:

            async def call(token, seq, who):
                r = await c.post(
                    teacher.http + "/v1/completions",
                    json={"prompt": seq, "max_tokens": 0, "prompt_logprobs": 1},
                    headers={"authorization": f"Bearer {token}"},
                )
                assert r.status_code == 200, r.text
                done[who].append(time.perf_counter())

            tasks = [asyncio.create_task(call(A, s, "a")) for s in flood]
            await asyncio.sleep(0.3)  # A's calls are queued
            tasks += [asyncio.create_task(call(B, s, "b")) for s in few]
            await asyncio.gather(*tasks)
        return done

    done = asyncio.run(run())
    assert max(done["b"]) < np.median(done["a"]), "job B waited behind job A's whole burst"
