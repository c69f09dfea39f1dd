"""Who may use the teacher: bearer tokens from a file, each scoped to a job-id prefix, with its own quotas.

The token file (`--auth-tokens FILE`, `TEACHER_AUTH_TOKENS_FILE`) holds one token per line, fields separated by
whitespace; a `#` at the start of a line or after whitespace starts a comment, a `#` inside a field is part of it
(so a token may hold `#`; it may not hold whitespace):

    # token                            job-id prefix   quotas (optional; defaults from the settings)
    s3cr3t-for-team-a-0123456789abcdef team-a/         max_pending=256 tokens_per_s=50000
    s3cr3t-for-the-ci-0123456789abcdef                 (no prefix: any job id)
    s3cr3t-for-a-trl-job-0123456789abc team-b/         job=team-b/trl-1   (the job of requests naming none)
    s3cr3t-for-team-c-0123456789abcdef team-c/         weight=2   (two claims per batching round, default 1)

A call carries its token as `Authorization: Bearer TOKEN` (HTTP; or Basic credentials whose password is the
token, as a client sends for http://user:TOKEN@host) or `authorization: Bearer TOKEN` metadata
(gRPC). Tokens are compared in constant time, against every entry (no early exit), and are never logged or
echoed: a caller is known by its `Principal.name` (`token#<line>`). Without a token file every caller is
`ANONYMOUS_NAME`, scoped to every job, under the default quotas.
"""

from __future__ import annotations

import base64
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from services.teacher.errors import InvalidRequest, PermissionDenied, Unauthenticated
from services.teacher.types import check_id

ANONYMOUS_NAME = "anonymous"
_COMMENT = re.compile(r"(?:^|\s)#")
"""Where a comment starts: a `#` at the start of a line or after whitespace; a `#` inside a token is part of it."""
_QUOTA_KEYS = {"max_pending": int, "tokens_per_s": float, "max_queued_bytes": int, "weight": int}
MAX_WEIGHT = 64
"""The largest `weight=`: a round of the worker's claim serves a tenant at most this many times."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: what it may do and how much. `name` identifies it in logs, never the token."""

    name: str
    job_prefix: str
    """Job ids this caller may use start with this ("" for any)."""
    max_pending: int
    """Requests in flight on one front-end (0: no quota)."""
    tokens_per_s: float
    """Prompt + completion tokens admitted per second on one front-end (0: no quota)."""
    max_queued_bytes: int = 0
    """Bytes of this caller's requests held in Redis at once, across all its jobs, from one front-end (0: none)."""
    job: str = ""
    """The job of this caller's requests that name none (the vLLM dialect's stock clients send no job id);
    "" for none. Must lie within `job_prefix`."""
    weight: int = 1
    """This caller's share of the batching: claims per round of the worker's round-robin across tenants (a tenant
    of weight 2 gets two requests batched for every one of a tenant of weight 1), in 1..MAX_WEIGHT."""

    def authorize(self, job_id: str) -> None:
        """PermissionDenied (naming `job_id`) when `job_id` is outside this caller's prefix."""
        if not job_id.startswith(self.job_prefix):
            raise PermissionDenied(
                f"`job_id` {job_id!r} is outside this token's scope (job ids starting with "
                f"{self.job_prefix!r}).",
                "job_id",
            )


def _parse_line(fields: list[str], where: str, defaults: dict) -> tuple[str, str, dict]:
    """(token, prefix, quotas) of one line's whitespace-separated fields."""
    token, rest = fields[0], fields[1:]
    prefix = ""
    if rest and "=" not in rest[0]:
        prefix, rest = rest[0], rest[1:]
    quotas = dict(defaults)
    for item in rest:
        key, _, value = item.partition("=")
        if key == "job":
            quotas["job"] = _default_job(value, prefix, where)
            continue
        if key not in _QUOTA_KEYS:
            raise ValueError(
                f"{where}: unknown option {key!r}; expected one of {sorted([*_QUOTA_KEYS, 'job'])}"
            )
        try:
            quotas[key] = _QUOTA_KEYS[key](value)
        except ValueError:
            raise ValueError(f"{where}: {key} must be a number, got {value!r}") from None
        if key == "weight" and not 1 <= quotas[key] <= MAX_WEIGHT:
            raise ValueError(f"{where}: weight must be in [1, {MAX_WEIGHT}], got {value!r}")
        if quotas[key] < 0:
            raise ValueError(f"{where}: {key} must be >= 0")
    return token, prefix, quotas


def _default_job(value: str, prefix: str, where: str) -> str:
    """A token's `job=NAME`: a valid job id within the token's own prefix."""
    try:
        check_id(value, "job", required=True)
    except InvalidRequest as err:
        raise ValueError(f"{where}: {err.message}") from None
    if not value.startswith(prefix):
        raise ValueError(f"{where}: job={value!r} is outside the token's own prefix {prefix!r}")
    return value


def _secret_of(authorization: str | None) -> str | None:
    """The token an `Authorization` value carries: `Bearer <token>`, or `Basic` credentials whose password is
    the token (what a client sends for a URL like http://job:TOKEN@host, e.g. TRL's VLLMClient, which has no
    header option); None when there is none."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


class TokenTable:
    """The tokens of a front-end; `enabled` is False without a token file (everyone is anonymous)."""

    def __init__(self, entries: list[tuple[bytes, Principal]], anonymous: Principal | None) -> None:
        self._entries = entries
        self._anonymous = anonymous

    @property
    def enabled(self) -> bool:
        return self._anonymous is None

    @classmethod
    def from_settings(cls, settings) -> TokenTable:
        defaults = {
            "max_pending": settings.quota_max_pending,
            "tokens_per_s": settings.quota_tokens_per_s,
            "max_queued_bytes": settings.quota_max_queued_mb * 1024 * 1024,
        }
        if not settings.auth_tokens_file:
            return cls([], Principal(ANONYMOUS_NAME, "", **defaults))
        return cls.load(settings.auth_tokens_file, defaults)

    @classmethod
    def load(cls, path: str | Path, defaults: dict) -> TokenTable:
        """Reads a token file; ValueError naming the line (never the token) for a malformed one."""
        entries: list[tuple[bytes, Principal]] = []
        seen: set[bytes] = set()
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            fields = _COMMENT.split(line, maxsplit=1)[0].split()
            if not fields:
                continue
            where = f"{path}:{n}"
            token, prefix, quotas = _parse_line(fields, where, defaults)
            if token.encode() in seen:
                raise ValueError(f"{where}: the same token is listed twice")
            seen.add(token.encode())
            entries.append((token.encode(), Principal(f"token#{n}", prefix, **quotas)))
        if not entries:
            raise ValueError(f"{path}: no tokens (authentication would refuse every call)")
        return cls(entries, None)

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of an `Authorization` header value; Unauthenticated when it is missing or unknown."""
        if self._anonymous is not None:
            return self._anonymous
        token = _secret_of(authorization)
        if token is None:
            raise Unauthenticated(
                "a bearer token is required (Authorization: Bearer <token>).", "authorization"
            )
        given = token.encode()
        found: Principal | None = None
        for secret, principal in self._entries:  # every entry, so the time does not depend on which matched
            if hmac.compare_digest(secret, given):
                found = principal
        if found is None:
            raise Unauthenticated("the bearer token is not valid for this teacher.", "authorization")
        return found
