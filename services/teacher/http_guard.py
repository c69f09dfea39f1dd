"""What one HTTP client may hold of what every caller shares (issue 27): the event loop (gRPC runs on it too),
connections, and a 500's keep-alive connection.

- `BodyGuard` (ASGI) reads a request's body before the route does: counted as it arrives (413 at the limit,
  chunked bodies included), timed (the whole body within `body_timeout_s`, else 408 naming `body`), and, over
  `INLINE_BYTES`, screened in a child process (`BodyScreen`) so that a large body the teacher would refuse is
  refused without parsing it on the event loop.
- `guarded_h11` is uvicorn's h11 protocol with a header timeout (uvicorn has none: a connection that never
  finishes its header stays open) and a bound on open connections per client address.
- `KeepAliveOn500` keeps a connection open after a 500 (uvicorn closes it when the app re-raises, as
  Starlette's error middleware always does).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from starlette.responses import Response

log = logging.getLogger("prefix_distill.http")

INLINE_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop (~1 ms); larger ones are screened off it first."""

Verdict = tuple[int, str, str]
"""(HTTP status, param, message) of a refused body."""


RouteCheck = Callable[[object], "Verdict | None"]
"""A route's own refusal of a parsed body, run in the screen's child (picklable: a module-level function or a
`functools.partial` of one): the (status, param, message) its route would answer, or None to let it decide."""


def screen_json(raw: bytes, max_items: int, check: RouteCheck | None = None) -> Verdict | None:
    """Runs in the screen's child process: the refusal of a body that is not JSON, nested too deeply for the
    parser, or holds an array longer than `max_items` (no route accepts one: token ids and candidate rows are
    bounded by the model's context, a call's prompts by a job's queue), then the refusal its route's own `check`
    gives (its schema and the model's limits, so that a large body the route would refuse is not parsed on the
    event loop either); None for a body the route may parse."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return 422, "body", f"`body` is not valid JSON: {str(err)[:200]}."
    verdict = _too_long(value, max_items)
    if verdict is not None or check is None:
        return verdict
    try:
        return check(value)
    except Exception:  # noqa: BLE001 - a check that cannot tell leaves the body to its route, which can
        log.exception("a route's body check failed; the route decides")
        return None


def _too_long(value, max_items: int) -> Verdict | None:
    """The refusal of the first array longer than `max_items` in a parsed body, by its path."""
    stack = [(value, "")]
    while stack:  # iterative: the depth the parser accepted may exceed the recursion limit
        node, path = stack.pop()
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in node.items())
        elif isinstance(node, list):
            if len(node) > max_items:
                where = path or "body"
                return (
                    400,
                    where,
                    f"`{where}` holds {len(node)} items; no request of this teacher has more than {max_items} "
                    "(the model's context, or a job's queue).",
                )
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node) if isinstance(v, (dict, list)))
    return None


class BodyScreen:
    """`screen_json` in one child process: its parsing never holds this process's GIL, so a large hostile
    body costs the event loop one copy of its bytes, not the ~100 ms (per 4 MB) of parsing it. A body that passes
    is then parsed by its route as usual; one child bounds what hostile bodies can take from the machine."""

    def __init__(self, max_items: int, checks: dict[str, RouteCheck] | None = None) -> None:
        self.max_items = max_items
        self.checks = dict(checks or {})
        """Each route's own check by path (`screen_json`): routes not named get the structural screen only."""
        self._pool: ProcessPoolExecutor | None = None
        self.screened = 0
        """Bodies screened so far (the tests read it through `teacher_http_bodies_screened_total`)."""

    def start(self) -> None:
        """Starts the child now (else at the first large body); spawned, so it shares no thread of this one."""
        if self._pool is None:
            from services.teacher.worker import die_with_parent  # not left behind by a kill -9 either

            self._pool = ProcessPoolExecutor(
                1, mp_context=mp.get_context("spawn"), initializer=die_with_parent, initargs=(os.getpid(),)
            )
            self._pool.submit(int)  # the child starts in the background

    async def __call__(self, raw: bytes, path: str = "") -> Verdict | None:
        from services.teacher import metrics

        self.start()
        check = self.checks.get(path)
        try:
            verdict = await asyncio.wrap_future(self._pool.submit(screen_json, raw, self.max_items, check))
        except BrokenProcessPool:  # the child died (killed, out of memory): a fresh one for the next body
            self._pool = None
            return 503, "body", "the body screen restarted; send the request again."
        self.screened += 1
        metrics.BODIES_SCREENED.labels(outcome="refused" if verdict else "passed").inc()
        return verdict

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


ErrorResponse = Callable[..., object]
"""`(status, param, message, headers=None) -> Response`: the HTTP API's error envelope."""


class BodyGuard:
    """ASGI middleware: reads the whole body of a request that has one (see the module docstring), then hands
    the app a `receive` that replays it (later calls reach the client: a disconnect is still seen)."""

    def __init__(
        self, app, limit: int, timeout_s: float, error: ErrorResponse, screen: BodyScreen | None = None
    ) -> None:
        self.app, self.limit, self.timeout_s, self.error, self.screen = app, limit, timeout_s, error, screen

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _has_body(scope["headers"]):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline, chunks, size, more = loop.time() + self.timeout_s, [], 0, True
        close = {"connection": "close"}
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                msg = f"the request body did not arrive within {self.timeout_s:g} s (http_body_timeout_s)."
                return await self.error(408, "body", msg, close)(scope, receive, send)
            if message["type"] == "http.disconnect":
                # the client left, or its chunked framing broke (uvicorn has answered that with a 400): nobody
                # reads this answer, but the middleware around must get one, else it raises "No response
                # returned" and a 500 is logged and counted (issue 27 §4, a malformed chunk size)
                return await Response(status_code=499)(scope, receive, send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                msg = f"the request body is over the limit of {self.limit} bytes (stopped reading)."
                return await self.error(413, "body", msg, close)(scope, receive, send)
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        if self.screen is not None and len(raw) > INLINE_BYTES:
            verdict = await self.screen(raw, scope.get("path", ""))
            if verdict is not None:
                return await self.error(*verdict)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        return await self.app(scope, replay, send)


def _has_body(headers) -> bool:
    for name, value in headers:
        if name == b"content-length":
            return value.strip() != b"0"
        if name == b"transfer-encoding":
            return True
    return False


class KeepAliveOn500:
    """ASGI wrapper (outermost): an exception raised after the app sent its whole response (Starlette's error
    middleware sends the 500, then re-raises it for the server to log) is logged here and not passed on, so
    that uvicorn keeps the connection open as after any other response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        sent = False

        async def tracked(message):
            nonlocal sent
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                sent = True

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if not sent:
                raise
            log.exception("error in %s %s (answered 500)", scope.get("method"), scope.get("path"))


_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: 40\r\n\r\ntoo many open connections from this host\n"
)
_HEADER_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\nconnection: close\r\n"
    b"content-length: 34\r\n\r\nthe request header did not arrive\n"
)


def guarded_h11(header_timeout_s: float, max_per_client: int) -> type:
    """uvicorn's h11 protocol class (pass it as `uvicorn.Config(http=...)`) with two bounds:

    - a request's header (request line and fields) must arrive within `header_timeout_s` of the connection's
      opening or of its first byte after the previous response (else a raw 408, and the connection closes);
    - one client address holds at most `max_per_client` open connections (0: no bound); a connection over it
      is answered 503 and closed at once, before anything of it is parsed.

    The body has its own deadline in `BodyGuard`; an idle keep-alive connection closes after uvicorn's
    `timeout_keep_alive`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    open_by_host: collections.Counter[str] = collections.Counter()

    class GuardedH11(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _host = ""

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._host = self.client[0] if self.client else ""
            open_by_host[self._host] += 1
            if max_per_client and open_by_host[self._host] > max_per_client:
                transport.write(_REFUSED)
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc) -> None:
            open_by_host[self._host] -= 1
            if open_by_host[self._host] <= 0:
                del open_by_host[self._host]
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # part of a header: its clock runs from this first byte
                self._arm()
            else:
                self._disarm()

        def _arm(self) -> None:
            if self._timer is None:
                self._timer = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(_HEADER_TIMEOUT)
                self.transport.close()

    GuardedH11.open_by_host = open_by_host  # type: ignore[attr-defined]
    return GuardedH11
