"""gRPC at the edges: one table from ThawError to status codes and back, the
standard health service, and channel options shared by every client and server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from thaw.core import errors

# Bundles and manifests travel in single messages; 4 MiB (gRPC's default) is too small
# for a bundle. Must stay >= thaw.core.spec.MAX_BUNDLE_BYTES plus framing.
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

_TO_STATUS: dict[type[errors.ThawError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FunctionUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NoCapacity: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.OutOfMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}
_BY_CODE: dict[str, type[errors.ThawError]] = {}


def _index(cls: type[errors.ThawError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _index(sub)


_index(errors.ThawError)


def status_for(exc: errors.ThawError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in _TO_STATUS:
            return _TO_STATUS[cls]
    return grpc.StatusCode.INTERNAL


def encode_error(exc: errors.ThawError) -> str:
    """The status details carry the error's code and field so the client can rebuild it."""
    return json.dumps({"code": exc.code, "message": exc.message, "field": exc.field})


def decode_error(err: grpc.RpcError) -> errors.ThawError:
    """Turn a failed call back into the ThawError the server raised."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    try:
        payload = json.loads(details or "")
        cls = _BY_CODE.get(payload["code"], errors.ThawError)
        return cls(payload["message"], field=payload.get("field"))
    except (ValueError, KeyError, TypeError):
        pass
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return errors.Unavailable(f"peer unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.DeadlineExceeded(f"call timed out: {details}")
    return errors.ThawError(f"{code.name if code else 'error'}: {details}")


Req = TypeVar("Req")
Resp = TypeVar("Resp")


def servicer_method(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """Wrap an async servicer method: ThawError -> status from the one table."""

    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await fn(self, request, context)
        except errors.ThawError as exc:
            await context.abort(status_for(exc), encode_error(exc))
            raise  # unreachable: abort raises
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            structlog.get_logger().exception("unexpected error in servicer",
                                             method=fn.__name__)
            internal = errors.ThawError(f"internal error in {fn.__name__}: "
                                        f"{type(exc).__name__}: {exc}")
            await context.abort(grpc.StatusCode.INTERNAL, encode_error(internal))
            raise

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


async def call(coro: Awaitable[Resp]) -> Resp:
    """Await a client call; a failed RPC raises the matching ThawError."""
    try:
        return await coro
    except grpc.RpcError as exc:
        raise decode_error(exc) from exc


async def stream(rpc: Any) -> AsyncIterator[Any]:
    """The messages of a server-streaming call; a failed RPC raises the matching
    ThawError, and the call is cancelled when the caller stops early."""
    try:
        async for message in rpc:
            yield message
    except grpc.RpcError as exc:
        raise decode_error(exc) from exc
    finally:
        rpc.cancel()


def add_health(server: grpc.aio.Server, *services: str) -> health.aio.HealthServicer:
    """The standard grpc.health.v1 service, every named service SERVING."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def mark_serving(servicer: health.aio.HealthServicer, *services: str) -> None:
    for name in ("", *services):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
