"""The one table from ThawError to HTTP status; every error body is
{"error": {"code", "message", "field"?}}."""

from __future__ import annotations

from aiohttp import web

from thaw.core import errors

STATUS: dict[type[errors.ThawError], int] = {
    errors.InvalidArgument: 400,
    errors.Unauthenticated: 401,
    errors.PermissionDenied: 403,
    errors.NotFound: 404,
    errors.AlreadyExists: 409,
    errors.FunctionUnavailable: 503,
    errors.NoCapacity: 503,
    errors.Unavailable: 503,
    errors.OutOfMemory: 503,
    errors.DeadlineExceeded: 504,
    errors.InstanceFailed: 502,
}
# Seconds a client is told to wait before retrying a 503 (Retry-After).
RETRY_AFTER_SECONDS = 1


def status_of(exc: errors.ThawError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 500


def error_body(code: str, message: str, field: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"code": code, "message": message}
    if field:
        body["field"] = field
    return {"error": body}


def error_response(exc: errors.ThawError) -> web.Response:
    status = status_of(exc)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return web.json_response(error_body(exc.code, exc.message, exc.field), status=status,
                             headers=headers)
