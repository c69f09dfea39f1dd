"""Every route that takes input is in the OpenAPI document, with its body: the schemathesis suite
(test_bad_input_service.py) generates its cases from that document, so a route missing there is a route never
attacked. Built in-process (no request is served): the teacher's app with the analysis routes that the
composition root adds with `--student`, as `prefix-distill teacher serve --student` builds it."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute

from services.app.analysis_api import analysis_router
from services.teacher.frontend import Dispatcher
from services.teacher.http_api import create_app
from services.teacher.modelinfo import describe
from services.teacher.settings import TeacherSettings

NO_INPUT = {"/healthz", "/health", "/metrics", "/v1/models", "/v1/analysis"}
"""GET routes without parameters or body (the schema still lists them; schemathesis calls them too)."""


def leaf_routes(routes) -> list:
    """The routes of an app, those of included routers written out (FastAPI >= 0.16x keeps an included router
    as one entry; none here has a prefix)."""
    out = []
    for r in routes:
        inner = getattr(r, "original_router", None)
        out += leaf_routes(inner.routes) if inner is not None else [r]
    return out


@pytest.fixture(scope="module")
def app(tiny_teacher):
    settings = TeacherSettings(model=str(tiny_teacher), redis_url="redis://127.0.0.1:6379/15")
    info, tokenizer = describe(settings.engine_spec())
    # the analysis service is only called by requests, and none is made here
    return create_app(Dispatcher(settings, info, tokenizer), [analysis_router(None)])


def test_every_post_route_is_in_the_openapi_schema_with_its_body(app):
    paths = app.openapi()["paths"]
    posts = {r.path for r in leaf_routes(app.routes) if isinstance(r, APIRoute) and "POST" in r.methods}
    assert {"/v1/logprobs", "/v1/completions", "/v1/compare", "/v1/rescue"} <= posts
    missing = sorted(p for p in posts if "post" not in paths.get(p, {}))
    assert not missing, f"POST routes outside the OpenAPI schema: {missing}"
    bodiless = sorted(p for p in posts if "requestBody" not in paths[p]["post"])
    assert not bodiless, f"POST routes whose body the schema does not describe: {bodiless}"


def test_every_other_route_in_the_schema_or_known_to_take_no_input(app):
    paths = app.openapi()["paths"]
    hidden = {"/ui", "/ui/{name}", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    for r in leaf_routes(app.routes):
        if isinstance(r, APIRoute) and r.include_in_schema:
            assert r.path in paths, r.path
            if r.path in NO_INPUT:
                assert not r.dependant.query_params and not r.dependant.body_params, r.path
        else:
            assert r.path in hidden, f"{r.path} is hidden from the schema: add it or list it here"
