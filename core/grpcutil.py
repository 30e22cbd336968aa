"""gRPC at the edges: one table from ThawError to status codes and back, the
standard health service, channel options shared by every client and server, and the
internal channels and servers, mutual TLS under the platform's CA (core/pki.py)."""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from thaw.core import errors
from thaw.core.grpctrace import TraceClient, TraceServer
from thaw.core.grpcwrap import Around, AroundEach
from thaw.core.logs import bound_reason
from thaw.core.pki import Identity, allowed_callers, common_name, component_of

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
            internal = errors.ThawError(bound_reason(f"internal error in {fn.__name__}: "
                                                     f"{type(exc).__name__}: {exc}"))
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


# ---- internal channels and servers: mutual TLS -----------------------------------------

@functools.lru_cache(maxsize=16)
def _channel_credentials(tls: Identity) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key,
                                        certificate_chain=tls.cert)


def secure_channel(address: str, tls: Identity | None, peer: str) -> grpc.aio.Channel:
    """A channel to `peer` (a component: "scheduler", "agent") at `address`, presenting
    `tls` and accepting only `peer`'s certificate from the platform's CA, whatever
    host or IP the address names. `tls` None: plaintext, the development opt-out.
    Keep the channel: the handshake is paid once per connection, not per call."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS,
                                         interceptors=[TraceClient()])
    return grpc.aio.secure_channel(address, _channel_credentials(tls),
                                   options=channel_options(peer), interceptors=[TraceClient()])


def channel_options(peer: str) -> list[tuple[str, Any]]:
    """CHANNEL_OPTIONS plus the server name a TLS channel to `peer` verifies."""
    return [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", common_name(peer))]


def channel_credentials(tls: Identity) -> grpc.ChannelCredentials:
    """`tls` as gRPC client credentials (for a blocking channel: tools, tests)."""
    return _channel_credentials(tls)


def caller_of(context: grpc.aio.ServicerContext) -> str | None:
    """The component whose certificate made this call; None when the connection
    carried none (plaintext) or a name that is no component's."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    names = auth.get("x509_common_name") or []
    return component_of(names[0].decode()) if names else None


async def _check_caller(context: grpc.aio.ServicerContext, method: str) -> None:
    caller = caller_of(context)
    if caller is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, encode_error(
            errors.Unauthenticated(f"{method} needs a platform certificate (mutual TLS)")))
    allowed = allowed_callers(method)
    if caller not in allowed:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, encode_error(
            errors.PermissionDenied(
                f"{method} may not be called by the {caller}; callers: "
                f"{', '.join(sorted(allowed)) or 'none'}")))


def _guarded(method: str) -> Around:
    """A call's context that first checks its caller may call `method`."""
    @asynccontextmanager
    async def around(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await _check_caller(context, method)
        yield
    return around


class CallerCheck(AroundEach):
    """Every call needs a certificate of a component that core/pki.py CALLERS lets call
    its method: none (a plaintext connection) is UNAUTHENTICATED, the wrong component
    PERMISSION_DENIED. The TLS handshake already refused certificates of other CAs."""

    def around(self, details: grpc.HandlerCallDetails) -> Around:
        method: str = details.method
        return _guarded(method)


def internal_server(tls: Identity | None) -> grpc.aio.Server:
    """A gRPC server for internal services: with `tls`, every call's certificate is
    checked against CALLERS (CallerCheck); add its port with `add_secure_port`."""
    interceptors: list[grpc.aio.ServerInterceptor] = [TraceServer()]
    if tls is not None:
        interceptors.insert(0, CallerCheck())
    return grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=interceptors)


def is_loopback(address: str) -> bool:
    """Does host:port name this machine's loopback only (not 0.0.0.0, not an interface)?"""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_secure_port(server: grpc.aio.Server, address: str, tls: Identity | None) -> int:
    """Listen on `address` with mutual TLS: the handshake refuses a client without a
    certificate from the platform's CA. `tls` None: plaintext, the development opt-out,
    which listens on loopback only. Returns the bound port."""
    if tls is None:
        if not is_loopback(address):
            raise errors.InvalidArgument(
                f"insecure_internal serves plaintext gRPC with no credential: it listens "
                f"on loopback only, not {address}; give the services certificates "
                "(`thaw pki init`) to listen there", field="insecure_internal")
        return int(server.add_insecure_port(address))
    credentials = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                              require_client_auth=True)
    return int(server.add_secure_port(address, credentials))
