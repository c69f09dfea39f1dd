"""The service's exceptions and the one place that maps them to HTTP and gRPC status codes.

Clients must be able to tell bad input (INVALID_ARGUMENT / 400) from back-pressure (RESOURCE_EXHAUSTED / 429),
an unreachable backend (UNAVAILABLE / 503) and a crash (INTERNAL / 500). Codes are gRPC status names (strings)
so this module, like the engine, never imports grpc.
"""

from __future__ import annotations


class TeacherError(Exception):
    """Base class: `code` is a gRPC status name, `param` the request field at fault (or "")."""

    code = "INTERNAL"

    def __init__(self, message: str, param: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):  # picklable with its fields (multiprocessing, tests)
        return (type(self), (self.message, self.param))


class InvalidRequest(TeacherError, ValueError):
    """The request is malformed or exceeds a model limit; `param` names the field."""

    code = "INVALID_ARGUMENT"


class QueueFull(TeacherError):
    """The job already has the maximum number of pending requests."""

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
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

_BY_CODE = {cls.code: cls for cls in (InvalidRequest, QueueFull, Unavailable, DeadlineExceeded)}


def from_code(code: str, message: str, param: str = "") -> TeacherError:
    """Rebuilds the exception for a status name (e.g. from a worker's error record or a gRPC status)."""
    return _BY_CODE.get(code, Internal)(message, param)


def http_status(err: TeacherError) -> int:
    """HTTP status code for an exception of this module."""
    return HTTP_STATUS.get(err.code, 500)
