"""The HTTP transport (FastAPI): POST /v1/logprobs, GET /v1/models, /healthz, /metrics, /docs, and the vLLM
dialect (`GET /health`, `POST /v1/completions`: services/teacher/dialect/).

For analysis and humans (curl, notebooks); students use gRPC. Errors are always
`{"error": {"param": ..., "message": ..., "type": ..., "code": ...}}` (OpenAI's envelope, as vLLM writes it): 400 for bad values, 422 for a malformed body (types are strict, as
on gRPC: `"top_k": "3"` is refused), 401 without a valid bearer token and 403 for a job outside the token's
scope (when auth is on), 408 for a body that did not arrive within `http_body_timeout_s`, 413 for a body over `max_request_mb`, 429 (with `Retry-After`) for a full job queue or a
spent quota, 503 when Redis or every worker is unreachable; never a 500 for bad input (a 500 keeps its keep-alive connection). Bodies over 64 KiB are screened off the event loop first (services.teacher.http_guard). Authentication is one
middleware (`_guard`) in front of every route, the analysis routers included, except `OPEN_PATHS`.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.teacher import metrics
from services.teacher.dialect.routes import vllm_router
from services.teacher.errors import TeacherError, http_status
from services.teacher.frontend import Dispatcher
from services.teacher.http_guard import BodyGuard, BodyScreen, Verdict
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.textapi import TokenTexts, logprobs_body, render_json, resolve_ids
from services.teacher.types import ModelInfo, ScoreRequest, ScoreResult
from services.teacher.validation import validate_request
from services.teacher.values import StrictIds


class LogprobsRequest(BaseModel):
    """Body of POST /v1/logprobs: exactly one of prompt / prompt_token_ids and of completion / completion_token_ids."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = Field(None, description="Prompt text (tokenized without special tokens).")
    prompt_token_ids: StrictIds | None = Field(None, description="Prompt as token ids.")
    completion: str | None = Field(None, description="Completion text to score.")
    completion_token_ids: StrictIds | None = Field(None, description="Completion as token ids.")
    top_k: int = Field(0, description="Most likely next tokens to list per position.")
    temperature: float = Field(
        1.0, description="Softmax temperature, in [1e-6, 1e6] (values.MIN_TEMPERATURE)."
    )
    candidate_ids: list[StrictIds] | None = Field(
        None,
        description="Per completion position, C token ids whose logprobs to return under `candidates` (in the "
        "order given, normalized over the whole vocabulary), e.g. a student's own top-C; C <= max_candidates.",
    )
    job_id: str = Field("http", description="Job the request is queued under (fairness, quotas).")


OPEN_PATHS = frozenset(
    {"/healthz", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/ui"}
)
"""Paths served without a token (health probes, the API's own description, the analysis page). `/health` is
the vLLM dialect's probe: TRL's `check_server` sends no credentials (and polls forever on a 404)."""
OPEN_PREFIXES = ("/ui/",)
"""Path prefixes served without a token: the analysis page's static files (no data; the page sends the token
its user types with each API call)."""


ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}
"""`error.type` by status, as vLLM names them (its `create_error_response`): OpenAI's envelope on every route."""


def error_body(status: int, param: str, message: str) -> dict:
    """`{"error": {"message", "type", "param", "code"}}`: the project's `{param, message}` inside OpenAI's (and
    vLLM's) error envelope, so that stock clients of the vLLM dialect read the same errors."""
    kind = ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error(status: int, param: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, param, message), headers=headers)


def error_of(exc: TeacherError) -> JSONResponse:
    """The response of a TeacherError: its status, `Retry-After` for back-pressure, `WWW-Authenticate` for 401."""
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if exc.code == "UNAUTHENTICATED":
        headers["WWW-Authenticate"] = "Bearer"
    return _error(http_status(exc), exc.param, exc.message, headers)


def openapi_body(*models: type[BaseModel]) -> dict:
    """`openapi_extra` of a route that reads its body itself (`request.body()`): the JSON schema of `models` (one
    of them, when several: `anyOf`, since the route tells the forms apart itself, and a generator finds few bodies
    valid under exactly one) as its required request body, `$defs` written out, so that the OpenAPI document (and
    the schemathesis suite generated from it) covers that route's input too."""

    def inline(schema: dict) -> dict:
        defs = schema.pop("$defs", {})

        def walk(node):
            if isinstance(node, dict):
                if "$ref" in node:
                    return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
                return {k: walk(v) for k, v in node.items()}
            return [walk(v) for v in node] if isinstance(node, list) else node

        return walk(schema)

    schemas = [inline(m.model_json_schema()) for m in models]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _install_guard(app: FastAPI, dispatcher: Dispatcher) -> None:
    """Refuses oversize bodies (413) and, when auth is on, calls without a valid token (401); the caller is
    left in `request.state.principal` for the routes (job scopes and quotas are checked on submit)."""
    limit = dispatcher.settings.max_request_bytes
    open_paths = OPEN_PATHS | ({"/metrics"} if not dispatcher.settings.metrics_need_token else set())

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if "content-length" in request.headers and "transfer-encoding" in request.headers:
            # request smuggling: a proxy that reads the length and this server (the chunks) would split the
            # stream differently; RFC 9112 §6.1: refuse or read the chunks, and close the connection either way
            # (h11 read the chunks and kept it open, answering the request hidden behind them)
            return _error(
                400,
                "body",
                "`Content-Length` and `Transfer-Encoding` together (RFC 9112 §6.1): send one of them.",
                {"Connection": "close"},
            )
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > limit:
            return _error(413, "body", f"the request body is {size} bytes, over the limit of {limit}.")
        path = request.url.path
        if path not in open_paths and not path.startswith(OPEN_PREFIXES):
            try:
                request.state.principal = dispatcher.authenticate(request.headers.get("authorization"))
            except TeacherError as err:
                metrics.REQUESTS.labels(transport="http", code=err.code).inc()
                return error_of(err)
        return await call_next(request)


def _param_of(exc: RequestValidationError) -> tuple[str, str]:
    """(field, message) of a malformed body's first error: `top_k`, `prompt_token_ids[3]`, or `body`."""
    first = exc.errors()[0] if exc.errors() else {}
    param = ""
    for part in first.get("loc", ()):
        if isinstance(part, int):
            param += f"[{part}]" if param else ""
        elif part != "body":
            param += ("." if param else "") + str(part)
    return param or "body", first.get("msg", "invalid request body")


def _model_card(info: ModelInfo, served_name: str, created: int) -> dict:
    """The entry of GET /v1/models: OpenAI's (and vLLM's) model card, then the model's limits and tokenizer
    fingerprint (what the project's own trainer reads)."""
    return {
        "id": served_name,
        "object": "model",
        "created": created,
        "owned_by": "prefix-distill",
        "root": info.model_id,
        "parent": None,
        "max_model_len": info.max_context,
        "permission": [],
        "backend": info.backend,
        "dtype": info.dtype,
        "device": info.device,
        "vocab_size": info.vocab_size,
        "max_context": info.max_context,
        "max_top_k": info.max_top_k,
        "max_full_elements": info.max_full_elements,
        "supports_full": info.supports_full,
        "max_candidates": info.max_candidates,
        "max_batch_tokens": info.max_batch_tokens,
        "max_pending_per_job": info.max_pending_per_job,
        "eos_token_id": info.eos_token_id,
        "tokenizer_fingerprint": info.tokenizer_fingerprint,
    }


def _score_request(body: LogprobsRequest, tokenizer) -> ScoreRequest:
    """The ScoreRequest of a /v1/logprobs body; InvalidRequest naming the field."""
    p, c = resolve_ids(
        tokenizer, body.prompt, body.prompt_token_ids, body.completion, body.completion_token_ids
    )
    return ScoreRequest(
        p,
        c,
        request_id="http",
        job_id=body.job_id,
        top_k=body.top_k,
        temperature=body.temperature,
        candidate_ids=body.candidate_ids,
    )


async def _request_of(dispatcher: Dispatcher, body: LogprobsRequest) -> ScoreRequest:
    """The ScoreRequest of a body (text tokenized off the event loop); rejections are counted here, since
    they never reach the dispatcher (which counts its own outcomes)."""
    try:
        return await asyncio.to_thread(_score_request, body, dispatcher.tokenizer)
    except TeacherError as err:
        metrics.REQUESTS.labels(transport="http", code=err.code).inc()
        raise


def body_error(err: ValidationError) -> RequestValidationError:
    """A body model's ValidationError as FastAPI reports a malformed body (its locations under `body`)."""
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False)])


def verdict_of(err: Exception) -> Verdict:
    """(status, param, message) of a refusal, as the route's error handlers answer it (install_error_handlers)."""
    if isinstance(err, RequestValidationError):
        return 422, *_param_of(err)
    assert isinstance(err, TeacherError), err
    return http_status(err), err.param, err.message


def screen_logprobs(value, info: ModelInfo) -> Verdict | None:
    """/v1/logprobs's refusal of a parsed body, in the body screen's child (http_guard.RouteCheck): its schema,
    then, for a body of token ids, the request's checks and the model's limits (a body with text needs the
    tokenizer: its route decides)."""
    try:
        body = LogprobsRequest.model_validate(value)
        if body.prompt is None and body.completion is None:
            validate_request(_score_request(body, None), info)
    except ValidationError as err:
        return verdict_of(body_error(err))
    except TeacherError as err:
        return verdict_of(err)
    return None


def install_error_handlers(app: FastAPI) -> None:
    """The error shape `{"error": {"param", "message"}}` on `app`: 422 for a malformed body, the status of each
    TeacherError otherwise (also used by other HTTP apps that speak this API, e.g. the analysis app)."""

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.REQUESTS.labels(transport="http", code="INVALID_ARGUMENT").inc()
        return _error(*verdict_of(exc))

    @app.exception_handler(TeacherError)
    async def teacher_error(_request: Request, exc: TeacherError) -> JSONResponse:
        return error_of(exc)

    @app.exception_handler(Exception)
    async def internal(_request: Request, _exc: Exception) -> JSONResponse:
        # sent by Starlette's error middleware, which then re-raises for the server to log (http_guard's
        # KeepAliveOn500 logs it instead, keeping the connection)
        metrics.REQUESTS.labels(transport="http", code="INTERNAL").inc()
        return _error(500, "", "internal error (logged by the teacher).")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body that is not UTF-8, an unknown path or method) in the same shape
        param = "body" if exc.status_code in (400, 413, 422) else ""
        return _error(exc.status_code, param, str(exc.detail), getattr(exc, "headers", None))


def create_app(dispatcher: Dispatcher, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The FastAPI app over a started Dispatcher (which must carry the tokenizer), plus any extra `routers` a
    composition root adds (the teacher itself defines none)."""
    app = FastAPI(
        title="prefix-distill teacher",
        description="Token-level teacher log-probabilities for on-policy (prefix) distillation.",
        version="1.0",
    )
    info = dispatcher.info
    texts = TokenTexts(dispatcher.tokenizer)
    served_name, created = dispatcher.settings.served_model_name or info.model_id, int(time.time())
    install_error_handlers(app)
    # inside the guard (added after it): a caller without a valid token is refused before its body is read
    settings = dispatcher.settings
    dialect = vllm_router(dispatcher, served_name)
    checks = {"/v1/logprobs": functools.partial(screen_logprobs, info=info)}
    for router in (dialect, *routers):  # a router's own body checks (`body_checks`), by path
        checks |= getattr(router, "body_checks", {})
    app.state.body_screen = BodyScreen(max(info.max_context, settings.max_pending_per_job), checks)
    app.add_middleware(
        BodyGuard,
        limit=settings.max_request_bytes,
        timeout_s=settings.http_body_timeout_s,
        error=_error,
        screen=app.state.body_screen,
    )
    _install_guard(app, dispatcher)
    app.include_router(dialect)
    app.state.quotas = dispatcher.quotas  # routes added by a composition root charge their callers here too
    for router in routers:
        app.include_router(router)

    @app.post("/v1/logprobs")
    async def logprobs(body: LogprobsRequest, request: Request) -> Response:
        """The teacher's log-probability of each completion token, with its top-k alternatives."""
        req = await _request_of(dispatcher, body)
        raw, _ = await dispatcher.submit(req, "http", principal=request.state.principal)
        result = ScoreResult.from_pb(pb.ScoreResponse.FromString(raw))
        body_json = logprobs_body(
            info.model_id, texts, req.prompt_token_ids, req.completion_token_ids, result, req.candidate_ids
        )
        return Response(render_json(body_json), media_type="application/json")

    @app.get("/v1/models")
    async def models() -> dict:
        """The model behind this teacher, its limits and tokenizer fingerprint."""
        return {"object": "list", "data": [_model_card(info, served_name, created)]}

    @app.get("/healthz")
    @app.get("/health")
    async def healthz() -> JSONResponse:
        """200 while Redis answers and a worker is alive, else 503."""
        body = {
            "status": "ok" if dispatcher.serving else "unavailable",
            "redis": dispatcher.redis_ok,
            "workers": dispatcher.live_workers,
            "model": info.model_id,
        }
        return JSONResponse(status_code=200 if dispatcher.serving else 503, content=body)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        """Prometheus exposition: queue depth per job (the jobs within the caller's scope; the rest summed as
        job="_other"), batch sizes, tokens/s, latencies, errors by code."""
        principal = getattr(request.state, "principal", None)
        if principal is None:  # no token asked (metrics_need_token off): no job label unless auth is off
            prefix = None if dispatcher.tokens.enabled else ""
        else:
            prefix = principal.job_prefix
        return Response(metrics.exposition(prefix), media_type=CONTENT_TYPE_LATEST)

    return app
