"""Errors a handler raises to answer its caller with a status of its choosing.

Tenant code imports them as `from thaw.snapshotter.runtime.errors import HTTPError,
InvalidInput`: the runtime package is the one part of thaw every instance sees (the
base environment, a function's own environment and the docker runtime all put it on
the path), and the classes are the ones the runtime's server matches, since it runs
from the same package. The server answers them with their status and
`{"error": {"code", "message", "field"}}`, marked as the tenant's own answer
(TENANT_ERROR_HEADER) so the gateway does not count it against the function's health.
Standard library only: this module is imported inside every instance.
"""

from __future__ import annotations

import http
import math

# Response header the runtime sets on an answer a handler chose (one of the errors
# below); the gateway's dispatch.py TENANT_ERROR_HEADER reads the same name.
TENANT_ERROR_HEADER = "X-Thaw-Error"
TENANT_ERROR_VALUE = "tenant"

# Statuses the platform keeps for itself: after a 502, 504 or 507 the gateway takes the
# instance for lost (crashed, hung, out of memory) and replaces it, so a handler
# cannot answer them. 503 and 429 stay allowed: the gateway tells the data plane's
# refusals from a handler's by this module's header.
RESERVED_STATUSES = frozenset((502, 504, 507))
MIN_STATUS = 400
MAX_STATUS = 599


def check_status(status: object, what: str, low: int, high: int) -> None:
    """Refuse a `status` given to `what` that is not an int from `low` to `high` or is
    one the platform keeps (RESERVED_STATUSES)."""
    if isinstance(status, bool) or not isinstance(status, int):
        raise TypeError(f"{what} status must be an int, got {type(status).__name__}")
    if not low <= status <= high or status in RESERVED_STATUSES:
        reserved = ", ".join(str(s) for s in sorted(RESERVED_STATUSES))
        raise ValueError(f"{what} status must be {low}-{high} and not "
                         f"{reserved} (kept by the platform), got {status}")


class HTTPError(Exception):
    """Answer the call with `status` (400-599 but RESERVED_STATUSES) and `detail` as the
    error message; `field` names the input at fault, if one is; `retry_after` (seconds,
    for a 429 or 503) is sent as Retry-After, which clients wait for before retrying."""

    code = "http_error"

    def __init__(self, status: int, detail: str = "", field: str | None = None, *,
                 retry_after: float | None = None) -> None:
        check_status(status, "HTTPError", MIN_STATUS, MAX_STATUS)
        if field is not None and not isinstance(field, str):
            raise TypeError(f"HTTPError field must be a str, got {type(field).__name__}")
        if retry_after is not None and (
                isinstance(retry_after, bool) or not isinstance(retry_after, (int, float))
                or not math.isfinite(retry_after) or retry_after < 0):
            raise ValueError(f"HTTPError retry_after must be a number of seconds >= 0, "
                             f"got {retry_after!r}")
        super().__init__(status, detail, field)
        self.status = status
        self.detail = str(detail)
        self.field = field
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.detail

    def __reduce__(self) -> tuple[object, ...]:
        # The instance's __dict__ goes along: a subclass's own attributes survive.
        return (_rebuild, (type(self), self.status, self.detail, self.field,
                           self.retry_after), self.__dict__)

    def retry_after_header(self) -> str | None:
        """Whole seconds, rounded up (HTTP allows no fractions); None without one."""
        return None if self.retry_after is None else str(math.ceil(self.retry_after))


class InvalidInput(HTTPError, ValueError):
    """The caller's input is wrong: answered 422, with `field` naming the input at
    fault. A ValueError too, so code that catches ValueError still catches it."""

    code = "invalid_input"

    def __init__(self, message: str = "", field: str | None = None) -> None:
        super().__init__(422, message, field)


def _rebuild(cls: type[HTTPError], status: int, detail: str, field: str | None,
             retry_after: float | None) -> HTTPError:
    """Unpickle without calling a subclass's own __init__ (its arguments differ)."""
    exc = cls.__new__(cls)
    HTTPError.__init__(exc, status, detail, field, retry_after=retry_after)
    return exc


def tenant_error_body(exc: HTTPError) -> dict[str, dict[str, str]]:
    """The answer's body: the gateway's error shape, `field` only when one is named."""
    error = {"code": exc.code, "message": exc.detail or _default_message(exc.status)}
    if exc.field:
        error["field"] = exc.field
    return {"error": error}


def _default_message(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return f"error {status}"
