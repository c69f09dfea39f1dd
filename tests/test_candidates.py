"""Per-position candidate ids: the teacher's logprobs at exactly the ids a request names (issue 10, section 4).

The engine is checked against an independent plain transformers forward over each unpadded sequence, then
log_softmax over the whole vocabulary at the request's temperature, then a gather at the ids; the wire (gRPC and
HTTP) against a real `teacher serve` process; bad candidate inputs against both transports, the service staying
up. Nothing is mocked.
"""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest
import torch
from teacher_proc import Teacher, assert_invalid_argument, unary_score

from services.teacher.client import TeacherClient
from services.teacher.engine import hf as hf_module
from services.teacher.engine import load_engine
from services.teacher.errors import InvalidRequest
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.types import ScoreRequest, ScoreResult

VOCAB = 512
MAX_CANDIDATES = 8
TOL = 1e-4


@pytest.fixture(scope="module")
def reference_model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


def reference_candidates(model, req: ScoreRequest) -> np.ndarray:
    """(T, C) logprobs at req.candidate_ids from one unpadded forward of the whole model (no engine code)."""
    ids = torch.tensor([req.prompt_token_ids.tolist() + req.completion_token_ids.tolist()])
    with torch.no_grad():
        logits_SV = model(input_ids=ids).logits[0].float()
    P, T = req.prompt_token_ids.size, req.completion_token_ids.size
    lp_TV = torch.log_softmax(logits_SV[P - 1 : P + T - 1] / req.temperature, dim=-1)
    return lp_TV.gather(1, torch.from_numpy(req.candidate_ids)).numpy()


def candidate_requests(n: int, seed: int, **kw) -> list[ScoreRequest]:
    """`n` ragged requests; request i asks for C = 1 + i % 6 random candidate ids per position (some repeat)."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        T = int(rng.integers(1, 20))
        reqs.append(
            ScoreRequest(
                rng.integers(0, VOCAB, int(rng.integers(1, 30))),
                rng.integers(0, VOCAB, T),
                request_id=f"c{seed}-{i}",
                candidate_ids=rng.integers(0, VOCAB, (T, 1 + i % 6)),
                **kw,
            )
        )
    return reqs


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("cache_mb", [0, 64], ids=["plain", "prompt-reuse"])
def test_engine_candidates_equal_plain_forward(tiny_teacher, reference_model, temperature, cache_mb):
    engine = load_engine(str(tiny_teacher), prompt_cache_mb=cache_mb)
    reqs = candidate_requests(7, seed=int(temperature * 10), temperature=temperature, top_k=3)
    reqs.append(ScoreRequest([1, 2, 3], [4, 5], temperature=temperature))  # no candidates in the same batch
    results = engine.score(reqs)
    for req, res in zip(reqs[:-1], results[:-1], strict=True):
        assert res.candidate_logprobs.dtype == np.float32
        assert res.candidate_logprobs.shape == req.candidate_ids.shape
        np.testing.assert_allclose(
            res.candidate_logprobs, reference_candidates(reference_model, req), atol=TOL
        )
    assert results[-1].candidate_logprobs is None


def test_engine_candidates_agree_with_token_top_k_and_full_rows(tiny_teacher):
    """The same gather as the other outputs: candidates naming the sampled token, the top-k ids or every id
    give exactly those logprobs; all V ids are the full row (whose exp sums to 1)."""
    engine = load_engine(str(tiny_teacher), prompt_cache_mb=0)
    rng = np.random.default_rng(3)
    T = 6
    comp = rng.integers(0, VOCAB, T)
    (plain,) = engine.score([ScoreRequest([7, 8, 9], comp, top_k=4, full=True, temperature=0.9)])
    every = np.tile(np.arange(VOCAB), (T, 1))
    mixed = np.concatenate([comp[:, None], plain.top_k_ids], axis=1)
    engine_all = load_engine(str(tiny_teacher), prompt_cache_mb=0, max_candidates=VOCAB)
    (res_all,) = engine_all.score([ScoreRequest([7, 8, 9], comp, temperature=0.9, candidate_ids=every)])
    (res_mix,) = engine.score([ScoreRequest([7, 8, 9], comp, temperature=0.9, candidate_ids=mixed)])
    np.testing.assert_array_equal(res_all.candidate_logprobs, plain.full_float32())
    np.testing.assert_array_equal(res_mix.candidate_logprobs[:, 0], plain.token_logprobs)
    np.testing.assert_array_equal(res_mix.candidate_logprobs[:, 1:], plain.top_k_logprobs)
    np.testing.assert_allclose(np.exp(res_all.candidate_logprobs).sum(1), 1.0, atol=1e-5)


def test_engine_candidates_across_logit_chunks(tiny_teacher, reference_model, monkeypatch):
    monkeypatch.setattr(hf_module, "LOGIT_CHUNK_ELEMENTS", 3 * VOCAB)  # 3 positions per chunk
    engine = load_engine(str(tiny_teacher), prompt_cache_mb=0)
    reqs = candidate_requests(5, seed=11, temperature=1.3)
    for req, res in zip(reqs, engine.score(reqs), strict=True):
        np.testing.assert_allclose(
            res.candidate_logprobs, reference_candidates(reference_model, req), atol=TOL
        )


BAD_STATIC = [
    (dict(candidate_ids=[[1, 2]]), "candidate_ids"),  # 1 row for 2 positions
    (dict(candidate_ids=[[1, 2], [3]]), "candidate_ids"),  # ragged
    (dict(candidate_ids=[1, 2]), "candidate_ids"),  # not (T, C)
    (dict(candidate_ids=[[1.5], [2.0]]), "candidate_ids"),
    (dict(candidate_ids=[[1], [-1]]), "candidate_ids"),
]


@pytest.mark.parametrize("kw,param", BAD_STATIC)
def test_bad_candidates_are_refused_when_built(kw, param):
    with pytest.raises(InvalidRequest) as ei:
        ScoreRequest([1], [2, 3], **kw)
    assert ei.value.param == param and f"`{param}`" in ei.value.message


def test_engine_refuses_out_of_vocab_and_too_many_candidates(tiny_teacher):
    engine = load_engine(str(tiny_teacher), max_candidates=MAX_CANDIDATES)
    assert engine.info.max_candidates == MAX_CANDIDATES
    out = engine.score(
        [
            ScoreRequest([1], [2], candidate_ids=[[VOCAB]]),
            ScoreRequest([1], [2], candidate_ids=[list(range(MAX_CANDIDATES + 1))]),
            ScoreRequest([1], [2], candidate_ids=[list(range(MAX_CANDIDATES))]),
        ]
    )
    assert (
        isinstance(out[0], InvalidRequest)
        and out[0].param == "candidate_ids"
        and "vocab_size" in out[0].message
    )
    assert (
        isinstance(out[1], InvalidRequest) and out[1].param == "candidate_ids" and "at most" in out[1].message
    )
    assert isinstance(out[2], ScoreResult) and out[2].candidate_logprobs.shape == (1, MAX_CANDIDATES)


def test_wire_round_trip_of_request_and_result():
    req = ScoreRequest([1, 2], [3, 4, 5], candidate_ids=np.arange(6).reshape(3, 2))
    m = req.to_pb()
    assert m.num_candidates == 2 and list(m.candidate_ids) == [0, 1, 2, 3, 4, 5]
    back = ScoreRequest.from_pb(pb.ScoreRequest.FromString(m.SerializeToString()))
    np.testing.assert_array_equal(back.candidate_ids, req.candidate_ids)
    assert ScoreRequest.from_pb(ScoreRequest([1], [2]).to_pb()).candidate_ids is None
    res = ScoreResult("r", np.zeros(3, np.float32), candidate_logprobs=-np.ones((3, 2), np.float32))
    back_res = ScoreResult.from_pb(pb.ScoreResponse.FromString(res.to_pb().SerializeToString()))
    np.testing.assert_array_equal(back_res.candidate_logprobs, res.candidate_logprobs)
    assert ScoreResult.from_pb(ScoreResult("r", np.zeros(3, np.float32)).to_pb()).candidate_logprobs is None


# -- the service: a real `teacher serve` process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tiny_teacher, redis_url, tmp_path_factory):
    flags = {"max-candidates": str(MAX_CANDIDATES)}
    with Teacher(tiny_teacher, redis_url, tmp_path_factory.mktemp("cand"), flags=flags) as t:
        yield t


@pytest.fixture(scope="module")
def engine(tiny_teacher):
    return load_engine(str(tiny_teacher), max_candidates=MAX_CANDIDATES)


def test_grpc_round_trip_equals_engine(teacher, engine):
    reqs = candidate_requests(10, seed=5, temperature=0.8, top_k=2)
    expected = engine.score(reqs)

    async def go():
        async with TeacherClient(teacher.target) as c:
            info = await c.model_info()
            return info, await c.score(reqs[0]), await c.score_many(reqs)

    info, one, many = asyncio.run(go())
    assert info.max_candidates == MAX_CANDIDATES
    np.testing.assert_allclose(one.candidate_logprobs, expected[0].candidate_logprobs, atol=1e-5)
    for got, exp in zip(many, expected, strict=True):
        np.testing.assert_allclose(got.candidate_logprobs, exp.candidate_logprobs, atol=1e-5)
        np.testing.assert_array_equal(got.top_k_ids, exp.top_k_ids)


def test_http_round_trip_equals_engine(teacher, engine):
    cand = [[5, 9, 300], [0, 1, 2], [511, 7, 5]]
    body = {"prompt_token_ids": [3, 4, 5], "completion_token_ids": [6, 7, 8], "temperature": 1.7}
    r = httpx.post(teacher.http + "/v1/logprobs", json={**body, "candidate_ids": cand}, timeout=30)
    assert r.status_code == 200, r.text
    (exp,) = engine.score([ScoreRequest([3, 4, 5], [6, 7, 8], temperature=1.7, candidate_ids=cand)])
    tokens = r.json()["tokens"]
    assert [[c["token_id"] for c in tok["candidates"]] for tok in tokens] == cand
    got = np.array([[c["logprob"] for c in tok["candidates"]] for tok in tokens])
    np.testing.assert_allclose(got, exp.candidate_logprobs, atol=1e-5)
    plain = httpx.post(teacher.http + "/v1/logprobs", json=body, timeout=30).json()
    assert "candidates" not in plain["tokens"][0]  # the DESIGN.md body is unchanged without candidates
    card = httpx.get(teacher.http + "/v1/models", timeout=10).json()["data"][0]
    assert card["max_candidates"] == MAX_CANDIDATES


BAD_GRPC = [
    (dict(candidate_ids=[1, 2, 3], num_candidates=2), "candidate_ids"),  # 3 ids, T x C = 2 x 2
    (dict(candidate_ids=[1, 2], num_candidates=0), "num_candidates"),
    (dict(num_candidates=-1), "num_candidates"),
    (dict(candidate_ids=[1, VOCAB, 2, 3], num_candidates=2), "candidate_ids"),
    (dict(candidate_ids=[-4, 2, 2, 3], num_candidates=2), "candidate_ids"),
    (
        dict(candidate_ids=list(range(2 * (MAX_CANDIDATES + 1))), num_candidates=MAX_CANDIDATES + 1),
        "candidate_ids",
    ),
]


@pytest.mark.parametrize("fields,param", BAD_GRPC)
def test_bad_candidates_grpc(teacher, fields, param):
    base = dict(prompt_token_ids=[1, 2], completion_token_ids=[3, 4])
    with grpc.insecure_channel(f"127.0.0.1:{teacher.grpc_port}") as ch:
        score = unary_score(ch)
        with pytest.raises(grpc.RpcError) as ei:
            score(pb.ScoreRequest(request_id="bad", **base, **fields), timeout=10)
        assert_invalid_argument(ei.value, param)
        ok = score(pb.ScoreRequest(request_id="ok", **base, candidate_ids=[1, 2, 3, 4], num_candidates=2))
        assert list(ok.candidate_logprobs.shape) == [2, 2]  # the service stays up and right


BAD_HTTP = [
    ({"candidate_ids": [[1, 2]]}, 400, "candidate_ids"),
    ({"candidate_ids": [[1, 2], [3]]}, 400, "candidate_ids"),
    ({"candidate_ids": [[1], [VOCAB]]}, 400, "candidate_ids"),
    ({"candidate_ids": [[1], [-1]]}, 400, "candidate_ids"),
    ({"candidate_ids": [list(range(MAX_CANDIDATES + 1))] * 2}, 400, "candidate_ids"),
    ({"candidate_ids": [[1], ["a"]]}, 422, "candidate_ids[1][0]"),
    ({"candidate_ids": [1, 2]}, 422, "candidate_ids[0]"),
]


@pytest.mark.parametrize("extra,status,param", BAD_HTTP)
def test_bad_candidates_http(teacher, extra, status, param):
    body = {"prompt_token_ids": [1, 2], "completion_token_ids": [3, 4]}
    r = httpx.post(teacher.http + "/v1/logprobs", json={**body, **extra}, timeout=10)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    ok = httpx.post(teacher.http + "/v1/logprobs", json={**body, "candidate_ids": [[1], [2]]}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["tokens"][0]["candidates"]) == 1
