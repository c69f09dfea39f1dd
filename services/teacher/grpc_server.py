"""The gRPC transport: `teacher.v1.Teacher` (Score, ScoreStream, GetModelInfo), health and reflection.

The servicer only converts and delegates to the `Dispatcher`. Bytes pass through in both directions: a request
is parsed (to validate it) and its original bytes are queued; a response is forwarded as the bytes the worker
serialized. The front-end never re-encodes a message. All exceptions are
mapped to status codes in one place (`_status`): bad input is INVALID_ARGUMENT with the field named, never
INTERNAL; back-pressure carries a `retry-after-ms` hint. Every teacher.v1 call is authenticated from its
`authorization` metadata (`auth.py`; health and reflection stay open). With a certificate and key in the
settings the port serves TLS only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from services.teacher.errors import (
    PARAM_TRAILER,
    RETRY_AFTER_TRAILER,
    STREAM_ACCEPTED_HEADER,
    Internal,
    InvalidRequest,
    TeacherError,
)
from services.teacher.frontend import Dispatcher
from services.teacher.pb.teacher.v1 import teacher_pb2 as pb
from services.teacher.types import ScoreRequest
from services.teacher.wire import int32_overflow

log = logging.getLogger("prefix_distill.grpc")
SERVICE = "teacher.v1.Teacher"


def _passthrough(msg) -> bytes:
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


@dataclass(frozen=True)
class _Received:
    """A ScoreRequest as it arrived: its bytes and the parsed message (None when the bytes are not a valid
    message, which is reported as INVALID_ARGUMENT rather than UNKNOWN)."""

    data: bytes
    message: pb.ScoreRequest | None

    @classmethod
    def parse(cls, data: bytes) -> _Received:
        try:
            return cls(data, pb.ScoreRequest.FromString(data))
        except (DecodeError, ValueError, RuntimeError):  # whatever the parser makes of hostile bytes
            return cls(data, None)

    @property
    def request_id(self) -> str:
        return self.message.request_id if self.message is not None else ""

    def request(self) -> ScoreRequest:
        """The statically validated domain request; InvalidRequest for undecodable bytes."""
        if self.message is None:
            raise InvalidRequest("the request bytes are not a valid teacher.v1.ScoreRequest.", "request")
        overflow = int32_overflow(self.data, pb.ScoreRequest.DESCRIPTOR)  # parsed as its low 32 bits
        if overflow is not None:
            raise InvalidRequest(
                f"`{overflow}` holds a value outside int32 (the parser would keep only its low 32 bits).",
                overflow,
            )
        return ScoreRequest.from_pb(self.message)


def _retry_after_ms(err: TeacherError) -> int:
    return 0 if err.retry_after_s is None else max(1, round(err.retry_after_s * 1000))


def _error_response(request_id: str, err: TeacherError) -> pb.ScoreResponse:
    error = pb.Error(code=err.code, param=err.param, message=err.message, retry_after_ms=_retry_after_ms(err))
    return pb.ScoreResponse(request_id=request_id, error=error)


def _as_teacher_error(err: Exception) -> TeacherError:
    if isinstance(err, TeacherError):
        return err
    log.exception("unexpected error", exc_info=err)
    return Internal(f"internal error: {type(err).__name__}")


async def _status(context: grpc.aio.ServicerContext, err: Exception) -> None:
    """The one place that turns an exception into a gRPC status (and aborts the RPC)."""
    terr = _as_teacher_error(err)
    trailers = [(PARAM_TRAILER, terr.param)]
    if terr.retry_after_s is not None:
        trailers.append((RETRY_AFTER_TRAILER, str(_retry_after_ms(terr))))
    context.set_trailing_metadata(tuple(trailers))
    await context.abort(grpc.StatusCode[terr.code], terr.message)


def _authorization(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


class TeacherServicer:
    """Implements teacher.v1.Teacher over a Dispatcher."""

    def __init__(self, dispatcher: Dispatcher, stream_window: int) -> None:
        self.d = dispatcher
        self.stream_window = stream_window

    async def _forward(self, received: _Received, transport: str, principal, deadline_s=None) -> bytes:
        """Validates the request, queues its original bytes and returns the worker's response bytes."""
        body, _ = await self.d.submit(
            received.request(), transport, wire=received.data, principal=principal, deadline_s=deadline_s
        )
        return body

    async def Score(self, request: _Received, context) -> bytes:
        try:
            principal = self.d.authenticate(_authorization(context))
            return await self._forward(request, "grpc", principal, context.time_remaining())
        except Exception as err:  # noqa: BLE001 - mapped to a status
            await _status(context, err)

    async def ScoreStream(self, request_iterator, context):
        """Answers each request as soon as it is ready. At most `stream_window` requests are in flight: the
        reader stops pulling from the client until responses drain, so HTTP/2 flow control pushes back."""
        try:
            principal = self.d.authenticate(_authorization(context))
        except Exception as err:  # noqa: BLE001 - mapped to a status
            await _status(context, err)
        # The client writes nothing before this header (see client._stream): a refusal can then never race a
        # request write, which would hide our status behind a client-side INTERNAL (grpc/grpc#36066).
        await context.send_initial_metadata(((STREAM_ACCEPTED_HEADER, "1"),))
        out: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(self.stream_window)
        tasks: set[asyncio.Task] = set()
        done = object()

        async def one(m: _Received) -> None:
            try:
                body = await self._forward(m, "grpc_stream", principal, context.time_remaining())
            except Exception as err:  # noqa: BLE001 - reported in-band, the stream goes on
                body = _error_response(m.request_id, _as_teacher_error(err))
            await out.put(body)

        async def reader() -> None:
            try:
                async for m in request_iterator:
                    await window.acquire()
                    t = asyncio.create_task(one(m))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                await out.put(done)

        reader_task = asyncio.create_task(reader())
        try:
            while True:
                item = await out.get()
                if item is done:
                    break
                yield item
                window.release()
        finally:
            reader_task.cancel()
            for t in list(tasks):
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task

    async def GetModelInfo(self, _request: bytes, context) -> pb.ModelInfo:
        try:
            self.d.authenticate(_authorization(context))
        except Exception as err:  # noqa: BLE001 - mapped to a status
            await _status(context, err)
        return self.d.info.to_pb()


def _handler(servicer: TeacherServicer) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Score": grpc.unary_unary_rpc_method_handler(
                servicer.Score,
                request_deserializer=_Received.parse,
                response_serializer=_passthrough,
            ),
            "ScoreStream": grpc.stream_stream_rpc_method_handler(
                servicer.ScoreStream,
                request_deserializer=_Received.parse,
                response_serializer=_passthrough,
            ),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                servicer.GetModelInfo,
                # No deserializer: the handler gets the raw bytes, unread (ModelInfoRequest has no fields).
                response_serializer=_passthrough,
            ),
        },
    )


async def build_grpc_server(dispatcher: Dispatcher, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server for `dispatcher` (with health and reflection); returns it and its bound port."""
    s = dispatcher.settings
    server = grpc.aio.server(options=s.grpc_options())
    server.add_generic_rpc_handlers((_handler(TeacherServicer(dispatcher, s.stream_window)),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )

    async def on_health(serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await health.set("", status)
        await health.set(SERVICE, status)

    dispatcher.health_listeners.append(on_health)
    await on_health(dispatcher.serving)
    if s.tls_cert_file:
        key_cert = (Path(s.tls_key_file).read_bytes(), Path(s.tls_cert_file).read_bytes())
        bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([key_cert]))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    return server, bound
