"""POST /v1/compare and /v1/rescue of `prefix-distill analysis serve` against a real teacher service.

Real parts only: a teacher (`teacher serve`, one worker) over the real Redis, the tiny teacher and student, and
`analysis serve` started by `serve_analysis` (what the demo calls). Every number is checked against an
independent computation: plain transformers forward passes and greedy decoding in this process, KL written out in
numpy. The validation table checks the error shape and the field named, as for /v1/logprobs.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.app.analysis_cli import serve_analysis
from services.app.analysis_service import student_specs
from services.teacher.launch import TeacherProcess
from trainer.tasks import load_task

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def teacher(tiny_teacher, redis_url, tmp_path_factory):
    """A teacher service, starting (the analysis server starts meanwhile: it asks the teacher lazily)."""
    proc = TeacherProcess(tiny_teacher, redis_url, tmp_path_factory.mktemp("an-api") / "teacher.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def api(teacher, tiny_student, tmp_path_factory):
    server = serve_analysis(teacher.target, [tiny_student], log=tmp_path_factory.mktemp("an-srv") / "a.log")
    try:
        teacher.wait_healthy(120)
        with httpx.Client(base_url=server.base, timeout=60) as client:
            yield client
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ref(tiny_teacher, tiny_student):
    """The pair loaded here for reference computations (independent of the service)."""
    load = lambda p: AutoModelForCausalLM.from_pretrained(p).eval()  # noqa: E731
    return {
        "teacher": load(tiny_teacher),
        "student": load(tiny_student),
        "tok": AutoTokenizer.from_pretrained(tiny_student),
    }


@torch.no_grad()
def rows(model, prompt: list[int], completion: list[int]) -> np.ndarray:
    """(T, V) float64 log-probabilities of the next token at each completion position, by a plain forward."""
    logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.double(), -1).numpy()


def kl(p_lp: np.ndarray, q_lp: np.ndarray) -> np.ndarray:
    return (np.exp(p_lp) * (p_lp - q_lp)).sum(-1)


@torch.no_grad()
def greedy(model, prompt: list[int], n: int, eos: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        nxt = int(model(torch.tensor([prompt + out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
    return out


def test_students_are_named_by_folder_or_given_name():
    assert student_specs(["/m/student", "/n/student/", "small=/x/y"]) == [
        ("student", "/m/student"),
        ("student-2", "/n/student/"),
        ("small", "/x/y"),
    ]


def test_compare_single_matches_plain_forward(api, ref):
    r = api.post(
        "/v1/compare", json={"prompt": "What is 2+3?", "completion": " The answer is 5.", "top_k": 4}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    tok = ref["tok"]
    prompt = tok("What is 2+3?", add_special_tokens=False)["input_ids"]
    completion = tok(" The answer is 5.", add_special_tokens=False)["input_ids"]
    assert body["prompt_token_ids"] == prompt
    assert [t["token_id"] for t in body["tokens"]] == completion and not body["generated"]
    t_lp, s_lp = rows(ref["teacher"], prompt, completion), rows(ref["student"], prompt, completion)
    idx = np.arange(len(completion))
    got = {
        k: np.array([t[k] for t in body["tokens"]]) for k in body["tokens"][0] if k not in ("token", "top")
    }
    np.testing.assert_allclose(got["teacher_logprob"], t_lp[idx, completion], atol=2e-4)
    np.testing.assert_allclose(got["student_logprob"], s_lp[idx, completion], atol=2e-4)
    np.testing.assert_allclose(got["reverse_kl"], kl(s_lp, t_lp), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got["forward_kl"], kl(t_lp, s_lp), rtol=1e-3, atol=1e-4)
    assert body["total"]["reverse_kl"] == pytest.approx(kl(s_lp, t_lp).sum(), rel=1e-3)
    for t, tok_body in enumerate(body["tokens"]):
        top = tok_body["top"]
        assert [a["token_id"] for a in top] == list(np.argsort(-t_lp[t])[:4])
        np.testing.assert_allclose(
            [a["student_logprob"] for a in top], s_lp[t, [a["token_id"] for a in top]], atol=2e-4
        )


def test_compare_generate_scores_the_students_greedy_answer(api, ref):
    body = {"prompt_token_ids": [5, 17, 42], "generate": {"max_tokens": 10, "temperature": 0}, "top_k": 0}
    r = api.post("/v1/compare", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    expect = greedy(ref["student"], [5, 17, 42], 10, ref["tok"].eos_token_id)
    assert out["generated"] and [t["token_id"] for t in out["tokens"]] == expect
    assert all(t["top"] == [] for t in out["tokens"])
    s_lp = rows(ref["student"], [5, 17, 42], expect)
    np.testing.assert_allclose([t["student_logprob"] for t in out["tokens"]], s_lp.max(-1), atol=2e-4)


def test_compare_batch_is_the_mean_kl_by_position(api, ref):
    r = api.post(
        "/v1/compare", json={"task": "builtin:plan", "count": 3, "max_new_tokens": 6, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    tok, eos = ref["tok"], ref["tok"].eos_token_id
    sums, counts = np.zeros(6), np.zeros(6)
    for ex in load_task("builtin:plan").heldout[:3]:
        prompt = tok(ex.prompt, add_special_tokens=False)["input_ids"]
        answer = greedy(ref["student"], prompt, 6, eos)
        per_t = kl(rows(ref["student"], prompt, answer), rows(ref["teacher"], prompt, answer))
        sums[: len(per_t)] += per_t
        counts[: len(per_t)] += 1
    T = int((counts > 0).sum())
    assert out["prompts"] == 3 and out["count_by_position"] == counts[:T].astype(int).tolist()
    np.testing.assert_allclose(out["mean_kl_by_position"], sums[:T] / counts[:T], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(out["share_within"], np.cumsum(sums[:T]) / sums[:T].sum(), rtol=1e-3)
    assert out["share_within"][-1] == pytest.approx(1.0)


def test_rescue_is_teacher_prefix_then_student_greedy(api, ref):
    r = api.post(
        "/v1/rescue",
        json={"task": "builtin:plan", "count": 3, "lengths": [4, 0, 2], "max_new_tokens": 8, "examples": 3},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert [p["length"] for p in out["curve"]] == [0, 2, 4]
    tok, eos = ref["tok"], ref["tok"].eos_token_id
    held = load_task("builtin:plan").heldout[:3]
    for point in out["curve"]:
        L, verdicts = point["length"], []
        for ex, shown in zip(held, point["examples"], strict=True):
            prompt = tok(ex.prompt, add_special_tokens=False)["input_ids"]
            prefix = greedy(ref["teacher"], prompt, L, eos) if L else []
            cont = (
                greedy(ref["student"], prompt + prefix, 8 - len(prefix), eos)
                if not prefix or prefix[-1] != eos
                else []
            )
            assert shown["teacher_prefix"] == tok.decode(prefix, skip_special_tokens=True)
            assert shown["student"] == tok.decode(cont, skip_special_tokens=True)
            verdicts.append(ex.is_correct(tok.decode(prefix + cont, skip_special_tokens=True)))
            assert shown["correct"] == verdicts[-1]
        assert point["accuracy"] == pytest.approx(np.mean(verdicts))


BAD = [
    ("/v1/compare", {"prompt": "a", "completion": "b", "bogus": 1}, 422, "bogus"),
    ("/v1/compare", {"prompt": "a"}, 400, "completion"),
    ("/v1/compare", {"prompt": "a", "completion": "b", "generate": {"max_tokens": 3}}, 400, "completion"),
    ("/v1/compare", {"prompt": "a", "generate": {"max_tokens": 0}}, 422, "generate.max_tokens"),
    ("/v1/compare", {"prompt": "a", "generate": {"max_tokens": 3, "top_p": 1}}, 422, "generate.top_p"),
    ("/v1/compare", {"prompt": "a", "generate": {"max_tokens": 2000}}, 400, "generate.max_tokens"),
    ("/v1/compare", {"prompt": "a", "completion": "b", "student": "nobody"}, 400, "student"),
    ("/v1/compare", {"prompt": "a", "completion": "b", "top_k": 1000}, 400, "top_k"),
    ("/v1/compare", {"prompt": "a", "completion": "b", "top_k": -1}, 422, "top_k"),
    ("/v1/compare", {"prompt_token_ids": [1, 99999], "completion": "b"}, 400, "prompt_token_ids"),
    # out of range for any model: refused with the body's shape (as on /v1/logprobs and like top_k -1)
    ("/v1/compare", {"prompt": "a", "completion_token_ids": [-1]}, 422, "completion_token_ids[0]"),
    ("/v1/compare", {"prompt": "", "completion": "b"}, 400, "prompt"),
    ("/v1/compare", {"prompt": "a", "completion": "b", "job_id": "bad id!"}, 400, "job_id"),
    ("/v1/compare", {"task": "builtin:nope"}, 400, "task"),
    ("/v1/compare", {"task": "builtin:plan", "prompts": ["x"]}, 400, "task"),
    ("/v1/compare", {"prompts": ["x"], "count": 3}, 400, "count"),
    ("/v1/compare", {"task": "builtin:plan", "count": 100000}, 422, "count"),
    ("/v1/compare", {"prompts": ["x"], "max_new_tokens": 2000}, 400, "max_new_tokens"),
    ("/v1/compare", {"prompts": ["x"], "prompt_format": "chat"}, 400, "prompt_format"),
    ("/v1/rescue", {"task": "builtin:plan", "lengths": [0, -1]}, 422, "lengths[1]"),
    ("/v1/rescue", {"task": "builtin:plan", "lengths": [0, 50], "max_new_tokens": 10}, 400, "lengths[1]"),
    ("/v1/rescue", {"prompts": [{"prompt": "x"}]}, 422, "prompts[0].answer"),
    ("/v1/rescue", {"task": "builtin:plan", "count": 1000}, 422, "count"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD, ids=[f"{p}-{s}-{q}" for p, _, s, q in BAD])
def test_bad_requests_name_the_field(api, path, body, status, param):
    r = api.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b""])
def test_compare_body_must_be_a_json_object(api, raw):
    r = api.post("/v1/compare", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "body", r.text


def test_describe_and_page(api, teacher):
    info = api.get("/v1/analysis").json()
    assert info["teacher"]["model"] == teacher.model and [s["name"] for s in info["students"]] == ["student"]
    assert "builtin:plan" in info["tasks"]
    page = api.get("/ui")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert api.get("/ui/app.js").status_code == 200 and api.get("/ui/nothing.js").status_code == 404
    assert "/v1/compare" in api.get("/openapi.json").json()["paths"]
    assert httpx.get(teacher.http + "/ui").status_code == 404  # a teacher started without students: no page
