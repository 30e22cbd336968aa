"""The gateway's bounds on clients (docs/limits.md), on both of its servers: the fast
lane (core/http1server.py, given `http_limits` and the shared `AddressCap`) and
aiohttp, whose connections are made by `aiohttp_protocol`.

aiohttp holds the head to the same numbers with its own parser (max_line_size,
max_field_size, max_headers), but answers a head past them with a plain-text 400; the
handler here answers 431 with the gateway's JSON error instead. aiohttp has one timer
for a connection waiting for a head, new or kept alive: it is set to the shorter of
header_timeout_seconds and idle_timeout_seconds, so neither wait is ever exceeded.
Bodies are read by the routes within body_timeout_seconds between two reads and
body_deadline_seconds in all (gateway/request.py `read_body`, gateway/jsonbody.py);
a body refused unread is read and dropped for LINGER_SECONDS before the close.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from thaw.core.config import GatewayConfig
from thaw.core.http1limits import LINGER_SECONDS, AddressCap, HTTPLimits, refusal_bytes
from thaw.gateway.errors import error_body

log = structlog.get_logger()
# aiohttp's words for a head with more headers than max_headers (its parsers, C and
# Python, raise BadHttpMessage with them).
TOO_MANY_HEADERS = "Too many headers"


def http_limits(config: GatewayConfig) -> HTTPLimits:
    """The settings' bounds, for core/http1server.py."""
    return HTTPLimits(
        max_request_line_bytes=config.max_request_line_bytes,
        max_header_bytes=config.max_header_bytes, max_headers=config.max_headers,
        max_head_bytes=config.max_head_bytes,
        header_timeout=config.header_timeout_seconds,
        idle_timeout=config.idle_timeout_seconds,
        body_timeout=config.body_timeout_seconds,
        body_deadline=config.body_deadline_seconds)


def address_cap(config: GatewayConfig) -> AddressCap | None:
    """One cap for every listener of the process; None when the setting is 0."""
    most = config.max_connections_per_address
    return AddressCap(most) if most > 0 else None


class _LimitedHandler(RequestHandler):
    """aiohttp's connection, counted against the address cap and answering a head past
    the limits with 431."""

    def __init__(self, manager: web.Server, cap: AddressCap | None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._cap = cap
        self._counted: asyncio.BaseTransport | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._cap is not None:
            # A connection the fast lane handed over is counted already (a no-op).
            if not self._cap.admit(transport):
                # Never set up: aiohttp's server does not learn of it, and the
                # connection_lost that follows finds nothing to undo. What the client
                # sends meanwhile is dropped (see LINGER_SECONDS).
                self._manager = None
                self._refused = True
                if isinstance(transport, asyncio.WriteTransport):
                    transport.write(refusal_bytes(self._cap.most))
                asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
                return
            self._counted = transport
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._cap is not None and self._counted is not None:
            self._cap.release(self._counted)
            self._counted = None
        super().connection_lost(exc)

    def handle_error(self, request: Any, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        too_large = isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and TOO_MANY_HEADERS in str(exc))
        if not too_large:
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong):
            text = (f"the request line or a header is longer than {exc.args[1]} bytes "
                    "(max_request_line_bytes, max_header_bytes)")
        else:
            text = f"the request has more than {self.max_headers} headers (max_headers)"
        log.info("request head refused", status=431, reason=text)
        response = web.json_response(error_body("headers_too_large", text), status=431)
        response.force_close()
        return response


def aiohttp_protocol(server: web.Server, config: GatewayConfig, cap: AddressCap | None
                     ) -> Callable[[], asyncio.Protocol]:
    """The protocol factory for aiohttp's connections: as `server()` makes them
    (server: the AppRunner's, set up), with the gateway's limits."""
    loop = asyncio.get_running_loop()
    wait = min(config.header_timeout_seconds, config.idle_timeout_seconds)
    options: dict[str, Any] = {
        "loop": loop, "access_log": None, "keepalive_timeout": wait,
        "max_line_size": config.max_request_line_bytes,
        "max_field_size": config.max_header_bytes, "max_headers": config.max_headers,
        "lingering_time": LINGER_SECONDS}

    def make() -> asyncio.Protocol:
        return _LimitedHandler(server, cap, **options)

    return make
