"""Wrapping a grpc.aio handler's behaviours: the server interceptors (the caller check
in core/grpcutil.py, the trace context in core/grpctrace.py) run each call of a method
inside a context of their own (AroundEach)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

Around = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]
KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _wrapped(behavior: Callable[..., Any], around: Around) -> Callable[..., Any]:
    """`behavior` (a handler's unary or streaming function) run inside `around`, of the
    same kind: grpc.aio tells a coroutine handler from a generator one."""
    if inspect.iscoroutinefunction(behavior):
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await behavior(request, context)
        return unary

    async def streaming(request: Any, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[Any]:
        async with around(context):
            responses = behavior(request, context)
            if inspect.isasyncgen(responses):
                async for message in responses:
                    yield message
            else:
                for message in responses:
                    yield message
    return streaming


def around_each(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """The same handler (grpc's handlers are named tuples), each of its behaviours run
    inside `around(context)`."""
    wrapped: grpc.RpcMethodHandler = handler._replace(**{
        kind: _wrapped(getattr(handler, kind), around)
        for kind in KINDS if getattr(handler, kind) is not None})
    return wrapped


class AroundEach(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A server interceptor running each call of a method inside the context `around`
    gives for it; a method it gives none for is served untouched (not even wrapped)."""

    def around(self, details: grpc.HandlerCallDetails) -> Around | None:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        around = self.around(handler_call_details)
        return handler if around is None else around_each(handler, around)
