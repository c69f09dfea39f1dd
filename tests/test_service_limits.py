"""Service limits and namespacing: responses far above gRPC's 4 MB default get through (limits configured on
both sides), and two teachers with different models share one Redis database without mixing their work."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from teacher_proc import Teacher

from services.teacher.client import TeacherClient
from services.teacher.engine import load_engine
from services.teacher.types import ScoreRequest


@pytest.fixture(scope="module")
def wide_vocab(models_dir):
    """A tiny model whose output layer has 8,192 rows: 600 full float32 rows are 19.7 MB."""
    from services.models.tiny import build_tiny

    return build_tiny(models_dir / "wide-vocab", layers=1, hidden=32, seed=7, model_vocab=8192)


def test_large_full_rows_and_two_teachers_on_one_redis(wide_vocab, tiny_teacher, redis_url, tmp_path):
    big = Teacher(wide_vocab, redis_url, tmp_path, flags={"max-full-elements": str(8192 * 1024)})
    small = Teacher(tiny_teacher, redis_url, tmp_path)
    try:
        big.wait_healthy()
        small.wait_healthy()
        rng = np.random.default_rng(0)
        req = ScoreRequest(rng.integers(0, 8192, 10), rng.integers(0, 8192, 600), request_id="big", full=True)
        small_req = ScoreRequest([1, 2, 3], [4, 5, 6], request_id="small", top_k=3)

        async def go():
            async with TeacherClient(big.target) as b, TeacherClient(small.target) as s:
                return await asyncio.gather(b.score(req), b.score_many([req]), s.score_many([small_req] * 20))

        one, (many,), smalls = asyncio.run(go())
        assert one.full_logprobs.nbytes == 600 * 8192 * 4 > 4 * 1024 * 1024
        expected = load_engine(str(wide_vocab)).score_one(req)
        np.testing.assert_allclose(one.full_float32(), expected.full_float32(), atol=1e-5)
        np.testing.assert_allclose(many.full_float32(), expected.full_float32(), atol=1e-5)
        exp_small = load_engine(str(tiny_teacher)).score_one(small_req)
        for r in smalls:  # the small teacher's answers come from its own model, not the big one's
            np.testing.assert_allclose(r.token_logprobs, exp_small.token_logprobs, atol=1e-5)
            np.testing.assert_array_equal(r.top_k_ids, exp_small.top_k_ids)
    finally:
        big.stop()
        small.stop()


def test_a_teacher_whose_picked_port_was_taken_restarts_on_new_ports(
    tiny_teacher, redis_url, tmp_path, monkeypatch
):
    """The race CI hit: a port picked free is taken by another process before the teacher binds it."""
    import socket

    import httpx

    import services.teacher.launch as launch
    from services.util.net import free_port

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    monkeypatch.setattr(launch, "free_port", lambda: next(ports, None) or free_port())
    t = launch.TeacherProcess(tiny_teacher, redis_url, tmp_path / "t.log")
    try:
        t.wait_healthy(120)
        assert t.grpc_port != taken.getsockname()[1]
        assert httpx.get(t.http + "/healthz").status_code == 200
    finally:
        t.stop()
        taken.close()
