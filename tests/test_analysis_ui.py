"""The analysis page on the teacher's own HTTP front-end (`prefix-distill teacher serve --student`), in a real
browser: Debian's Chromium driven by playwright.

The page is loaded, a prompt submitted, and the colored tokens counted against the token count of the
/v1/compare answer the page received (and against the same request sent here); hovering a token must show the
teacher's top alternatives with both log-probabilities. A screenshot is saved under the test's tmp folder
(and at $ANALYSIS_UI_SCREENSHOT when set). The test skips, saying why, only where no Chromium can be installed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import httpx
import pytest
from analysis_page import compare_single, ensure_chromium, hover_token, launch, run_batch

from services.models.testbed import prepare_pair
from services.teacher.launch import ChildProcess, child_env
from services.util.net import free_port

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pair(tiny_teacher, tiny_student):
    """The testbed's plan pair (teacher and student that differ where the paper says they do), else the tiny
    random pair of the fixtures."""
    try:
        paths = prepare_pair("plan")
        return {"teacher": paths.teacher, "student": paths.student, "plan": True}
    except FileNotFoundError:
        return {"teacher": tiny_teacher, "student": tiny_student, "plan": False}


@contextlib.contextmanager
def serving(pair, redis_url, folder, *extra: str, env: dict | None = None):
    """`prefix-distill teacher serve` (the composition root's CLI) with a student; yields its HTTP base URL."""
    grpc_port, http_port = free_port(), free_port()
    args = [sys.executable, "-m", "services.app", "teacher", "serve", "--model", str(pair["teacher"])]
    args += ["--redis-url", redis_url, "--workers", "1", "--student", str(pair["student"])]
    args += ["--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port)]
    args += ["--http-host", "127.0.0.1", "--http-port", str(http_port), *extra]
    proc = ChildProcess(args, folder / "teacher.log", env={**child_env(), **(env or {})})
    base = f"http://127.0.0.1:{http_port}"
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.alive():
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            pytest.fail(f"the teacher with a student did not start:\n{proc.tail()}")
        yield base
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def front(pair, redis_url, tmp_path_factory):
    """The page at /ui of a teacher with a student, no auth."""
    with serving(pair, redis_url, tmp_path_factory.mktemp("an-ui")) as base:
        yield base


def test_teacher_front_end_serves_the_analysis(front):
    assert httpx.get(front + "/ui").status_code == 200
    r = httpx.post(
        front + "/v1/compare", json={"prompt": "hello", "completion": " world", "top_k": 2}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["tokens"]) > 0 and len(r.json()["tokens"][0]["top"]) == 2
    assert (
        httpx.post(front + "/v1/logprobs", json={"prompt": "hello", "completion": " world"}).status_code
        == 200
    )
    bad = httpx.post(front + "/v1/compare", json={"prompt": "hello", "completion": " world", "top_k": "x"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "top_k"


def test_teacher_prefix_rescues_the_plan_student(front, pair):
    """On `plan` the first token decides the answer: the student, which picks its plan blindly, is rescued by a
    one-token teacher prefix (the paper's motivating observation, measured through /v1/rescue)."""
    if not pair["plan"]:
        pytest.skip("the plan pair is not built (services/models/pairs/plan)")
    body = {"task": "builtin:plan", "count": 12, "lengths": [0, 1], "max_new_tokens": 110, "examples": 0}
    r = httpx.post(front + "/v1/rescue", json=body, timeout=120)
    assert r.status_code == 200, r.text
    acc = {p["length"]: p["accuracy"] for p in r.json()["curve"]}
    assert acc[1] >= 0.9 and acc[1] >= acc[0] + 0.3, acc


@pytest.fixture(scope="module")
def browser():
    why = ensure_chromium()
    if why:
        pytest.skip(f"browser test skipped: {why}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


def test_page_colors_every_token_and_shows_alternatives(front, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    body = compare_single(page, front, "P537=", tokens=16, temperature=0, top_k=5)
    n = len(body["tokens"])
    assert n > 0
    again = httpx.post(
        front + "/v1/compare",
        json={"prompt": "P537=", "generate": {"max_tokens": 16, "temperature": 0}, "top_k": 5},
        timeout=60,
    ).json()
    assert len(again["tokens"]) == n
    colors = page.eval_on_selector_all(
        "#tokens .tok", "els => els.map(e => getComputedStyle(e).backgroundColor)"
    )
    assert len(colors) == n
    assert all(c not in ("", "rgba(0, 0, 0, 0)", "transparent") for c in colors), colors

    tip = hover_token(page, 1)
    tok = body["tokens"][1]
    assert f"{tok['teacher_logprob']:.3f}" in tip and f"{tok['student_logprob']:.3f}" in tip
    assert page.locator("#tip table.alts tr").count() == 1 + len(tok["top"]) == 6
    assert f"{tok['top'][0]['teacher_logprob']:.3f}" in page.inner_text("#tip table.alts")
    page.screenshot(path=str(tmp_path / "ui.png"))
    if os.environ.get("ANALYSIS_UI_SCREENSHOT"):
        page.screenshot(path=os.environ["ANALYSIS_UI_SCREENSHOT"])
    assert (tmp_path / "ui.png").stat().st_size > 10_000

    run_batch(page, "builtin:plan", count=4, max_new_tokens=12, lengths="0,2,4")
    assert page.locator("#kl-chart rect.bar").count() > 0
    assert page.locator("#rescue-chart circle").count() == 3
    assert "of the KL" in page.inner_text("#share")
    page.fill("#lengths", "0,99")
    page.click("#rescue-btn")
    page.wait_for_selector("#error:not([hidden])")
    assert "lengths[1]" in page.inner_text("#error")  # errors are shown on the page, field named
    page.screenshot(path=str(tmp_path / "ui-batch.png"))
    assert not errors, errors


def test_page_of_a_teacher_with_tokens_asks_for_one(pair, redis_url, browser, tmp_path):
    """With --auth-tokens the page's files are open (they hold no data) but every API call needs the token: the
    page shows the 401, then works once the token is typed. The analysis reaches the teacher with its own token
    ($PREFIX_DISTILL_TEACHER_TOKEN of the serving process)."""
    (tmp_path / "tokens.txt").write_text("ui-token-123\nserver-token-456\n")
    served = serving(pair, redis_url, tmp_path, "--auth-tokens", str(tmp_path / "tokens.txt"),
                     env={"PREFIX_DISTILL_TEACHER_TOKEN": "server-token-456"})  # fmt: skip
    with served as base:
        for path in ("/ui", "/ui/app.js", "/ui/style.css"):
            assert httpx.get(base + path).status_code == 200, path
        assert httpx.get(base + "/v1/analysis").status_code == 401
        page = browser.new_page()
        page.goto(base + "/ui")
        page.wait_for_selector("#error:not([hidden])")
        assert "HTTP 401" in page.inner_text("#error")
        page.fill("#token", "ui-token-123")
        page.dispatch_event("#token", "change")
        page.wait_for_function("document.querySelector('#student').options.length > 0")
        assert page.is_hidden("#error"), page.inner_text("#error")
        body = compare_single(page, base, "P537=", tokens=8, temperature=0, top_k=3)
        assert len(body["tokens"]) > 0
