"""The one table from ThawError to HTTP status; every error body is
{"error": {"code", "message", "field"?}}.

The errors only the HTTP edge raises (load shedding, body limits) are defined here;
they are ThawErrors like the rest, so the table and the body format cover them.
"""

from __future__ import annotations

import math

from aiohttp import web

from thaw.core import errors

# Seconds a client is told to wait before retrying a 503 that carries no better
# estimate (Retry-After).
RETRY_AFTER_SECONDS = 1


class PayloadTooLarge(errors.InvalidArgument):
    """The request body is larger than the gateway's max_body_bytes."""

    code = "payload_too_large"


class BadFunctionAnswer(errors.ThawError):
    """The function answered, but not in the format the route needs (OpenAI routes)."""

    code = "bad_function_answer"


class RetryLater(errors.ThawError):
    """Refused for now; `retry_after` says in how many seconds trying again makes sense."""

    def __init__(self, message: str, *, retry_after: float, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class RateLimited(RetryLater):
    """The API key made more requests than its per-minute rate allows."""

    code = "rate_limited"


class TooManyFailedLogins(RetryLater):
    """This client address sent too many bad or unknown API keys lately."""

    code = "too_many_failed_logins"


class Overloaded(RetryLater):
    """Too many requests of this function are already waiting for an instance."""

    code = "overloaded"


class InstanceBusy(RetryLater):
    """The node kept refusing the call: the function's instances are all busy."""

    code = "instance_busy"


class CircuitOpen(RetryLater):
    """Recent calls to this function or node failed; calls fail fast for a while."""

    code = "circuit_open"


class InvocationExpired(errors.NotFound):
    """The invocation's result passed its TTL (result_ttl_seconds) and was deleted."""

    code = "invocation_expired"


class InvocationFinished(errors.ThawError):
    """The invocation already ended; it can no longer be cancelled."""

    code = "invocation_finished"


class InvocationCancelled(InvocationFinished):
    """The invocation was cancelled: it has no result."""

    code = "invocation_cancelled"


class IdempotencyKeyReused(errors.InvalidArgument):
    """An Idempotency-Key came again with a different request (function, path, body)."""

    code = "idempotency_key_reused"


class InputRejected(errors.InvalidArgument):
    """A call's JSON body does not match the function's typed inputs; `field` is the
    path of the input at fault ("text", "items.2")."""

    code = "invalid_input"


STATUS: dict[type[errors.ThawError], int] = {
    InputRejected: 422,
    PayloadTooLarge: 413,
    errors.BundleTooLarge: 413,
    IdempotencyKeyReused: 422,
    InvocationExpired: 410,
    InvocationFinished: 409,
    errors.InvalidArgument: 400,
    errors.Unauthenticated: 401,
    errors.PermissionDenied: 403,
    errors.NotFound: 404,
    errors.AlreadyExists: 409,
    RateLimited: 429,
    TooManyFailedLogins: 429,
    Overloaded: 429,
    errors.QuotaExceeded: 429,
    CircuitOpen: 503,
    InstanceBusy: 503,
    errors.FunctionUnavailable: 503,
    errors.NoCapacity: 503,
    errors.Unavailable: 503,
    errors.OutOfMemory: 503,
    errors.InsufficientStorage: 507,
    errors.DeadlineExceeded: 504,
    errors.InstanceFailed: 502,
    BadFunctionAnswer: 502,
}


def status_of(exc: errors.ThawError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(code: str, message: str, field: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"code": code, "message": message}
    if field:
        body["field"] = field
    return {"error": body}


def retry_after_header(exc: errors.ThawError, status: int) -> str | None:
    """Whole seconds, rounded up and at least 1 (RFC 9110 allows no fractions)."""
    if isinstance(exc, (RetryLater, errors.QuotaExceeded)):
        return str(max(1, math.ceil(exc.retry_after)))
    if status in (429, 503):
        return str(RETRY_AFTER_SECONDS)
    return None


def error_response(exc: errors.ThawError) -> web.Response:
    status = status_of(exc)
    retry_after = retry_after_header(exc, status)
    headers = {"Retry-After": retry_after} if retry_after else None
    return web.json_response(error_body(exc.code, exc.message, exc.field), status=status,
                             headers=headers)
