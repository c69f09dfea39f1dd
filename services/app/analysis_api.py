"""The analysis HTTP API and page: POST /v1/compare, POST /v1/rescue, GET /v1/analysis and the page at /ui.

One router serves both places the page lives: the teacher's own HTTP front-end when it is started with
`--student` (through the front-end's extra-routes hook), and `prefix-distill analysis serve` (its own small app).
Validation is as strict as /v1/logprobs and answers in the same shape (`{"error": {"param", "message"}}`): 422
for a malformed body (unknown fields, wrong types, out-of-range numbers, the field named), 400 for values the
models reject, 503 when the teacher cannot be reached. The shapes are checked here (pydantic), the rest in
services.app.analysis_service.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager, nullcontext, suppress
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.app.analysis_service import AnalysisService
from services.teacher.errors import InvalidRequest
from services.teacher.http_api import body_error, install_error_handlers, openapi_body, verdict_of
from services.teacher.values import SamplingTemperature, Seed, Text, TokenIds, TopK, parse_json
from trainer.teacher_io import AbandonableTeacher

UI_DIR = Path(__file__).resolve().parent / "analysis_ui"
UI_FILES = {"app.js": "text/javascript", "charts.js": "text/javascript", "style.css": "text/css"}
MAX_PROMPTS = 512
"""Most prompts in one batch or rescue request."""
MAX_NEW_TOKENS = 2048
"""Longest answer an analysis request may ask the student for (the teacher's context bounds it too)."""
Format = Literal["auto", "raw", "chat"]
_FORMAT_HELP = "How prompts are rendered for the student: its chat template when it has one (auto), or as is."


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    student: str | None = Field(None, description="A served student (GET /v1/analysis); optional when one.")
    job_id: str = Field(
        "analysis", description="Job the teacher requests are queued under (fairness, quotas)."
    )


class Generate(BaseModel):
    """Let the student write the completion."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_tokens: int = Field(
        description="Most tokens the student writes (it stops at EOS).", ge=1, le=MAX_NEW_TOKENS
    )
    temperature: SamplingTemperature = Field(1.0, description="Sampling temperature (0: greedy).", le=100)
    seed: Seed = Field(0, description="Seed of the sampler.")


class CompareRequest(_Body):
    """POST /v1/compare, single form: exactly one of prompt / prompt_token_ids, and exactly one of completion /
    completion_token_ids / generate. Text is tokenized without special tokens, as in /v1/logprobs."""

    prompt: Text | None = Field(None, description="Prompt text.")
    prompt_token_ids: TokenIds | None = Field(None, description="Prompt as token ids.")
    completion: Text | None = Field(None, description="Completion text to compare on.")
    completion_token_ids: TokenIds | None = Field(None, description="Completion as token ids.")
    generate: Generate | None = Field(None, description="Compare on the student's own answer instead.")
    top_k: TopK = Field(5, description="Teacher alternatives listed per position.")


class CompareBatchRequest(_Body):
    """POST /v1/compare, batch form (a body with `prompts` or `task`): the student answers every prompt; the
    result is the mean exact KL(student || teacher) by answer position and the share of it within the first L."""

    prompts: list[Text] | None = Field(
        None, description="Prompt texts.", min_length=1, max_length=MAX_PROMPTS
    )
    task: str | None = Field(None, description="A built-in task (builtin:NAME): its held-out prompts.")
    count: int = Field(16, description="How many of the task's prompts.", ge=1, le=MAX_PROMPTS)
    prompt_format: Format = Field("auto", description=_FORMAT_HELP)
    max_new_tokens: int = Field(64, description="Answer length (positions).", ge=1, le=MAX_NEW_TOKENS)
    temperature: SamplingTemperature = Field(
        1.0, description="The student's sampling temperature (0: greedy).", le=100
    )
    seed: Seed = Field(0, description="Seed of the sampler.")


class RescueItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Text = Field(description="Prompt text.")
    answer: Text = Field(description="The exact final answer (compared as in the trainer's evaluation).")


class RescueRequest(_Body):
    """POST /v1/rescue: the teacher writes the first L tokens (greedy), the student continues (greedy), the
    answer is checked; the accuracy for each L, with a few example continuations."""

    task: str | None = Field(None, description="A built-in task (builtin:NAME): its held-out prompts.")
    prompts: list[RescueItem] | None = Field(
        None, description="Prompts with exact answers.", min_length=1, max_length=MAX_PROMPTS
    )
    count: int = Field(16, description="How many of the task's prompts.", ge=1, le=MAX_PROMPTS)
    prompt_format: Format = Field("auto", description=_FORMAT_HELP)
    lengths: list[Annotated[int, Field(ge=0)]] = Field(
        [0, 2, 4, 8, 16, 32], description="Teacher prefix lengths L.", min_length=1, max_length=32
    )
    max_new_tokens: int = Field(128, description="Answer length, prefix included.", ge=1, le=MAX_NEW_TOKENS)
    examples: int = Field(3, description="Example continuations shown per L.", ge=0, le=20)


def _field_error(loc: tuple, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": message, "type": "value_error"}])


_COMPARE_BODY = openapi_body(CompareRequest, CompareBatchRequest)


def compare_body(raw) -> CompareRequest | CompareBatchRequest:
    """A parsed body as the single or the batch form (`prompts` or `task` marks a batch), or a 422 naming the
    field (RequestValidationError)."""
    if not isinstance(raw, dict):
        raise _field_error((), "the body must be a JSON object")
    model = CompareBatchRequest if ("prompts" in raw or "task" in raw) else CompareRequest
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise body_error(err) from None


async def _compare_body(request: Request) -> CompareRequest | CompareBatchRequest:
    """The body of a /v1/compare call (see `compare_body`)."""
    try:  # also JSON nested too deeply for the parser (RecursionError)
        raw = parse_json(await request.body())
    except InvalidRequest as err:
        raise _field_error((), err.message) from None
    return compare_body(raw)


def screen_compare(value) -> tuple | None:
    """/v1/compare's refusal of a parsed body's schema, in the HTTP body screen's child (http_guard.RouteCheck)."""
    try:
        compare_body(value)
    except RequestValidationError as err:
        return verdict_of(err)
    return None


def screen_rescue(value) -> tuple | None:
    """/v1/rescue's refusal of a parsed body's schema, in the HTTP body screen's child."""
    try:
        RescueRequest.model_validate(value)
    except ValidationError as err:
        return verdict_of(body_error(err))
    return None


def _authorize(request: Request, job_id: str) -> None:
    """On a teacher front-end with auth on, the caller's token (checked by its guard) must cover `job_id`: the
    analysis reaches the teacher with its own client's token, so the caller's scope is checked here."""
    principal = getattr(request.state, "principal", None)
    if principal is not None:
        principal.authorize(job_id)


def _teacher_tokens(body) -> int:
    """An upper estimate of the prompt + completion tokens an analysis makes the teacher score (text counted as
    one token per character), charged to the caller's tokens-per-second quota before it starts."""
    if isinstance(body, CompareRequest):
        prompt = len(body.prompt or "") + len(body.prompt_token_ids or [])
        answer = len(body.completion or "") + len(body.completion_token_ids or [])
        return prompt + (body.generate.max_tokens if body.generate else answer)
    n = len(body.prompts) if body.prompts else body.count
    if isinstance(body, RescueRequest):
        return n * body.max_new_tokens * len(body.lengths)
    return n * body.max_new_tokens


async def _charged(request: Request, body, run, service: AnalysisService):
    """`run(body, teacher)` in a thread, holding one in-flight slot of the caller's quota (and its estimated
    tokens), as every request that makes the teacher work does (on the teacher's own front-end only:
    `app.state.quotas`, since the analysis reaches the teacher with its own client's token). When the HTTP
    client disconnects first, the run's teacher calls are abandoned: the queued requests are withdrawn and
    no more are sent (the run's thread then stops at its next teacher call)."""
    quotas, principal = getattr(request.app.state, "quotas", None), getattr(request.state, "principal", None)
    teacher = AbandonableTeacher(service.teacher)
    with quotas.admit(principal, _teacher_tokens(body)) if quotas and principal else nullcontext():
        work = asyncio.ensure_future(asyncio.to_thread(run, body, teacher))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():
            teacher.abandon()
            with suppress(Exception):  # CallAbandoned, or whatever else ended it: nobody reads it
                await work  # the quota slot is held until the thread has left the teacher
            return Response(status_code=499)  # nobody reads it: the client has gone
        return work.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client of `request` (whose body has been read) disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def analysis_router(service: AnalysisService) -> APIRouter:
    """The analysis routes over `service` (the page, its data, and the two analyses)."""
    router = APIRouter(tags=["analysis"])
    router.body_checks = {
        "/v1/compare": screen_compare,
        "/v1/rescue": screen_rescue,
    }  # http_api's body screen

    @router.post("/v1/compare", openapi_extra=_COMPARE_BODY)
    async def compare(request: Request) -> JSONResponse:
        """Teacher vs student token by token (single form) or the mean KL by answer position (batch form)."""
        body = await _compare_body(request)
        _authorize(request, body.job_id)
        run = service.compare_batch if isinstance(body, CompareBatchRequest) else service.compare_one
        return JSONResponse(await _charged(request, body, run, service))

    @router.post("/v1/rescue")
    async def rescue(body: RescueRequest, request: Request) -> JSONResponse:
        """Teacher-prefix rescue: the student's accuracy after a teacher-written prefix of each length."""
        _authorize(request, body.job_id)
        return JSONResponse(await _charged(request, body, service.rescue, service))

    @router.get("/v1/analysis")
    async def describe() -> JSONResponse:
        """The served students, the built-in tasks, and the teacher."""
        return JSONResponse(await asyncio.to_thread(service.describe))

    @router.get("/ui", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(UI_DIR / "index.html", media_type="text/html")

    @router.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in UI_FILES:  # a fixed list: no path from the request reaches the file system
            raise HTTPException(404)  # as for any unknown route
        return FileResponse(UI_DIR / name, media_type=UI_FILES[name])

    return router


def create_analysis_app(service: AnalysisService) -> FastAPI:
    """The app of `prefix-distill analysis serve`: the analysis routes, /healthz, and the teacher's error shape."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(
        title="prefix-distill analysis",
        description="Where the distillation signal sits: teacher vs student token by token, KL by position, "
        "teacher-prefix rescue.",
        version="1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(analysis_router(service))

    @app.get("/healthz")
    async def healthz() -> dict:
        """200 once the students are loaded (the teacher is reported by GET /v1/analysis)."""
        return {"status": "ok", "students": sorted(service.students)}

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui")

    return app
