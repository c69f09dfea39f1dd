"""The vLLM dialect's route, `POST /v1/completions` (`GET /health` and `GET /v1/models` are the HTTP API's own).

Errors are the OpenAI envelope that every route of the HTTP API writes (`http_api.error_body`), with vLLM's
statuses: 400 for a bad or over-limit field (vLLM's own messages), 404 for another model's name, 401/403/429/503 as
on the native API. Auth is the HTTP API's guard: a Bearer token, or Basic credentials carrying it as the password
(TRL's client sends those for a URL like http://job:TOKEN@host:8000).

The job a call runs under (queues, fairness, quotas): the caller's token's own job (`job=` in the token file),
else the `X-Job-Id` header, else OpenAI's `user` field, else `DEFAULT_JOB` under the token's job-id prefix; the
prefix is enforced on all of them (403 naming `job_id`).
"""

from __future__ import annotations

import asyncio
import functools

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.teacher import metrics
from services.teacher.dialect.render import TokenTexts, completion_body, render
from services.teacher.dialect.request import CompletionBody, body_of, parse_body, plan_call
from services.teacher.dialect.scoring import CallScorer
from services.teacher.errors import TeacherError
from services.teacher.types import check_id

DEFAULT_JOB = "vllm"
"""The job of a call that names none, under the caller's job-id prefix."""
JOB_HEADER = "x-job-id"


def job_of(principal, header: str | None, user: str | None) -> str:
    """The job id of a call (see the module docstring); InvalidRequest naming the header or field."""
    if principal.job:
        return principal.job
    if header:
        return check_id(header, "X-Job-Id", required=True)
    if user:
        return check_id(user, "user", required=True)
    return principal.job_prefix + DEFAULT_JOB


def screen_completions(value, info, served: frozenset[str]):
    """/v1/completions's refusal of a parsed body, in the HTTP body screen's child (http_guard.RouteCheck): its
    schema, then, when no prompt is text (text needs the tokenizer: the route decides), every limit of the call."""
    from services.teacher.http_api import verdict_of

    try:
        body = body_of(value)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if not any(isinstance(p, str) for p in prompts):
            plan_call(body, None, info, served)
    except TeacherError as err:
        return verdict_of(err)
    return None


def vllm_router(dispatcher, served_name: str) -> APIRouter:
    """`POST /v1/completions` over a started Dispatcher (which carries the tokenizer)."""
    from services.teacher.http_api import error_of, openapi_body  # it includes this router

    router = APIRouter()
    info, tokenizer = dispatcher.info, dispatcher.tokenizer
    served = frozenset({served_name, info.model_id})
    router.body_checks = {  # read by http_api.create_app for its body screen
        "/v1/completions": functools.partial(screen_completions, info=info, served=served)
    }
    texts = TokenTexts(tokenizer)
    scorer = CallScorer(dispatcher, info.eos_token_id)

    @router.post("/v1/completions", openapi_extra=openapi_body(CompletionBody))
    async def completions(request: Request) -> Response:
        """vLLM's completions with `prompt_logprobs` (scoring) and one-token generations; see docs/vllm.md."""
        principal = request.state.principal
        try:  # refusals before anything is queued are counted here; the dispatcher counts the rest
            body = parse_body(await request.body())
            plan = await asyncio.to_thread(plan_call, body, tokenizer, info, served)
            job = job_of(principal, request.headers.get(JOB_HEADER), body.user)
            principal.authorize(job)
        except TeacherError as err:
            metrics.REQUESTS.labels(transport="vllm", code=err.code).inc()
            return error_of(err)
        try:
            scores = await scorer.score_call(plan, job, principal)
        except TeacherError as err:
            return error_of(err)
        out = await asyncio.to_thread(lambda: render(completion_body(served_name, texts, plan, scores)))
        return Response(out, media_type="application/json")

    return router
