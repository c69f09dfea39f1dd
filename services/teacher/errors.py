"""The service's exceptions and the one place that maps them to HTTP and gRPC status codes.

Clients must be able to tell bad input (INVALID_ARGUMENT / 400) from a missing or wrong token
(UNAUTHENTICATED / 401), a job outside the token's scope (PERMISSION_DENIED / 403), back-pressure
(RESOURCE_EXHAUSTED / 429, with a retry-after hint), an unreachable backend (UNAVAILABLE / 503) and a crash
(INTERNAL / 500). Codes are gRPC status names (strings) so this module, like the engine, never imports grpc.

Which failures a client retries is decided here too (`retryable`): UNAVAILABLE always, RESOURCE_EXHAUSTED only
when the server said when to come back (a full job queue or a spent quota carry `retry_after_s`; an oversize
message, refused by gRPC itself, does not and is never retried).
"""

from __future__ import annotations

PARAM_TRAILER = "x-error-param"
"""gRPC trailing metadata: the request field a failed call blames."""
RETRY_AFTER_TRAILER = "retry-after-ms"
"""gRPC trailing metadata: when to come back after RESOURCE_EXHAUSTED."""
STREAM_ACCEPTED_HEADER = "x-stream-accepted"
"""gRPC initial metadata on ScoreStream, sent once the caller is authenticated; clients write after it."""
CORE_INTERNAL_DETAILS = "Internal error from Core"
"""What grpcio's asyncio client reports, instead of the server's status, when it wrote into a stream that had
just ended (grpc/grpc#36066): the stream broke, the server never said INTERNAL, so it counts as UNAVAILABLE."""


class TeacherError(Exception):
    """Base class: `code` is a gRPC status name, `param` the request field at fault (or ""), `retry_after_s`
    the seconds after which a retry may succeed (back-pressure only; None when the server gave no hint)."""

    code = "INTERNAL"

    def __init__(self, message: str, param: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # picklable with its fields (multiprocessing, tests)
        return (type(self), (self.message, self.param, self.retry_after_s))


class InvalidRequest(TeacherError, ValueError):
    """The request is malformed or exceeds a model limit; `param` names the field."""

    code = "INVALID_ARGUMENT"


class Unauthenticated(TeacherError):
    """Authentication is on and the call carries no token, or one that is not in the token file."""

    code = "UNAUTHENTICATED"


class PermissionDenied(TeacherError):
    """The token is valid but its job-id prefix does not cover the request's `job_id`."""

    code = "PERMISSION_DENIED"


class QueueFull(TeacherError):
    """Back-pressure: the job already has the maximum number of pending requests, or the token's quota
    (pending requests, scored tokens per second) is spent. Carries `retry_after_s`."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(TeacherError):
    """Redis or every worker is unreachable; retrying later may succeed."""

    code = "UNAVAILABLE"


class DeadlineExceeded(TeacherError):
    """The request was not answered within its deadline."""

    code = "DEADLINE_EXCEEDED"


class Internal(TeacherError):
    """The engine failed on this request (after `max_tries` attempts, or for a bug)."""

    code = "INTERNAL"


HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

_BY_CODE = {
    cls.code: cls
    for cls in (InvalidRequest, Unauthenticated, PermissionDenied, QueueFull, Unavailable, DeadlineExceeded)
}


def from_code(code: str, message: str, param: str = "", retry_after_s: float | None = None) -> TeacherError:
    """Rebuilds the exception for a status name (e.g. from a worker's error record or a gRPC status)."""
    return _BY_CODE.get(code, Internal)(message, param, retry_after_s)


def retryable(err: TeacherError) -> bool:
    """Whether a client should send the request again: UNAVAILABLE (a restart, a Redis blip, no worker yet),
    or RESOURCE_EXHAUSTED with a retry-after hint (back-pressure). Everything else is final."""
    return err.code == "UNAVAILABLE" or (err.code == "RESOURCE_EXHAUSTED" and err.retry_after_s is not None)


def http_status(err: TeacherError) -> int:
    """HTTP status code for an exception of this module."""
    return HTTP_STATUS.get(err.code, 500)
