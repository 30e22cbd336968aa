"""The client's exceptions: one class per HTTP status family, built from the platform's
error body {"error": {"code", "message", "field"}}.

They subclass thaw.core.errors.ThawError, so the `thaw` CLI prints them as it prints
every error of the platform: one line, the status and the server's message."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx

from thaw.core.errors import ThawError as _PlatformError


class ThawError(_PlatformError):
    """An error answered by the platform (`status` > 0) or met on the way to it.

    `code` and `field` are the error body's; `retry_after` the seconds its Retry-After
    asked for (None without one)."""

    code = "error"

    def __init__(self, message: str, *, status: int = 0, code: str = "",
                 field: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, field=field)
        self.status = status
        if code:
            self.code = code
        self.retry_after = retry_after
        # Whether sending the same request again is safe and may succeed: set by the
        # client from the status, the method and who answered.
        self.retryable = False

    def __str__(self) -> str:
        return f"{self.status}: {self.message}" if self.status else self.message


class InvalidInput(ThawError):
    """400 or 422: the request is malformed or fails the function's input schema;
    `field` names the part at fault."""


class Unauthorized(ThawError):
    """401: no API key, or one the platform does not know."""


class Forbidden(ThawError):
    """403: the key lacks the scope for this action."""


class NotFound(ThawError):
    """404: the function, invocation or route does not exist."""


class Conflict(ThawError):
    """409: the name is taken, or the invocation already finished."""


class PayloadTooLarge(ThawError):
    """413: the body (or a bundle) is past a limit the message names."""


class RateLimited(ThawError):
    """429: refused for now; try again after `retry_after` seconds."""


class Unavailable(ThawError):
    """503 (no capacity, circuit open, a peer down) or the gateway could not be
    reached (`status` 0); try again after `retry_after` seconds."""


class ServerError(ThawError):
    """Any other 5xx: the call failed on the platform or in the function."""


class ResultTimeout(ThawError):
    """An invocation's result did not come within the time the caller gave."""


_BY_STATUS: dict[int, type[ThawError]] = {
    400: InvalidInput, 422: InvalidInput, 401: Unauthorized, 403: Forbidden,
    404: NotFound, 409: Conflict, 413: PayloadTooLarge, 429: RateLimited,
    503: Unavailable,
}


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date; None if absent or
    unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_body(body: Any) -> tuple[str, str, str | None]:
    """(code, message, field) of the platform's error body; empty code if it is not one."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return "", "", None
    field = err.get("field")
    return str(err.get("code") or ""), err["message"], field if isinstance(field, str) else None


def error_from(resp: httpx.Response) -> ThawError:
    """The typed exception for an answer of status >= 400 (its body already read)."""
    try:
        code, message, field = error_body(resp.json())
    except ValueError:
        code, message, field = "", "", None
    if not message:
        message = resp.text[:500] or resp.reason_phrase
    status = resp.status_code
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ThawError)
    return cls(message, status=status, code=code, field=field,
               retry_after=retry_after_seconds(resp.headers.get("Retry-After")))
