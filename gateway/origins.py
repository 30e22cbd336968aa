"""Two origins: the dashboard's and the functions'.

The dashboard keeps the caller's API key in the browser (sessionStorage), which any
script of the same origin can read. A function's answer is the tenant's content (HTML
and script included), so it must never run as the dashboard's origin:

- the gateway's port (the dashboard origin) serves everything, but only the dashboard's
  own page may run script there: every other answer, function answers included, carries
  `Content-Security-Policy: sandbox` (an opaque origin, no script), plus `nosniff`,
  `X-Frame-Options: DENY` and `Referrer-Policy: no-referrer`;
- the function origin (function_host:function_port, its own listener) serves function
  URLs and the routes that answer for an invocation (its stored status and result, the
  OpenAI-compatible calls, the Open Inference v2 routes, the MCP server's tool calls)
  as the function gave them,
  and nothing of the dashboard or the management API: a tenant's page there shares no
  origin with the dashboard.
  Function URLs the API hands out (function_json's `url`) point there.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from thaw.core.errors import NotFound

# The dashboard's own page: its files only ('self'), the live feed's WebSocket
# (connect-src 'self' covers ws:// and wss:// of the same host), the data: favicon.
DASHBOARD_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                 "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                 "form-action 'self'; frame-ancestors 'none'")
# Everything else the dashboard origin answers (API JSON, a function's answer):
# rendered, if at all, in a sandbox with no script and an origin of its own.
SANDBOX_CSP = "sandbox; default-src 'none'; frame-ancestors 'none'"
NOSNIFF = {"X-Content-Type-Options": "nosniff"}
DASHBOARD_ORIGIN_HEADERS = {**NOSNIFF, "X-Frame-Options": "DENY",
                            "Referrer-Policy": "no-referrer"}
# What the function origin serves (path prefixes); the rest is the dashboard origin's.
FUNCTION_ORIGIN_PREFIXES = ("/fn/", "/v1/invocations/", "/v1/chat/completions",
                            "/v1/completions", "/v1/embeddings", "/v2/",
                            "/v1/models/", "/v1/predictions/", "/files/")
FUNCTION_ORIGIN_PATHS = ("/healthz", "/livez", "/v1/invocations", "/v2", "/mcp")


@dataclass
class FunctionOrigin:
    """The function listener, once bound (server.py): its port, by which a request
    tells the listener it came in on (its socket's local port; the gateway's listener
    has another), and the host function URLs name ("" = the one the caller used)."""

    port: int = 0
    host: str = ""


FUNCTION_ORIGIN_KEY = web.AppKey("function_origin", FunctionOrigin)
ON_FUNCTION_ORIGIN_KEY = web.RequestKey("on_function_origin", bool)
"""Set on fast-lane requests by the listener that took them (server.py)."""


def is_dashboard_page(path: str) -> bool:
    return path == "/" or path.startswith("/static/")


def served_on_function_origin(path: str) -> bool:
    return path in FUNCTION_ORIGIN_PATHS or path.startswith(FUNCTION_ORIGIN_PREFIXES)


def on_function_origin(request: web.Request) -> bool:
    """The request came in through the function listener."""
    flagged = request.get(ON_FUNCTION_ORIGIN_KEY)
    if flagged is not None:
        return bool(flagged)
    origin = request.app.get(FUNCTION_ORIGIN_KEY)
    if origin is None or not origin.port or request.transport is None:
        return False
    local = request.transport.get_extra_info("sockname")
    return isinstance(local, tuple) and len(local) >= 2 and local[1] == origin.port


def security_headers(path: str, function_origin: bool) -> Mapping[str, str]:
    """The headers every answer to `path` carries on that origin (they replace any the
    function sent: its own CSP must not loosen the sandbox)."""
    if function_origin:
        return NOSNIFF
    csp = DASHBOARD_CSP if is_dashboard_page(path) else SANDBOX_CSP
    return {**DASHBOARD_ORIGIN_HEADERS, "Content-Security-Policy": csp}


def apply_security_headers(headers: MutableMapping[str, str], path: str,
                           function_origin: bool) -> None:
    for name, value in security_headers(path, function_origin).items():
        headers[name] = value


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp's answers, streamed ones included (the fast lane adds its own)."""
    apply_security_headers(response.headers, request.path, on_function_origin(request))


def function_base_url(request: web.Request, public_url: str) -> str:
    """Where function URLs point: `public_url` (the function origin's, set by the
    operator), else the function listener at the host name the caller used."""
    if public_url:
        return public_url.rstrip("/")
    origin = request.app.get(FUNCTION_ORIGIN_KEY)
    if origin is None or not origin.port:  # no listener (an app without server.py)
        return f"{request.scheme}://{request.host}"
    host = origin.host or request.url.host or "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{request.scheme}://{host}:{origin.port}"


@web.middleware
async def function_origin_middleware(request: web.Request, handler: Any
                                     ) -> web.StreamResponse:
    """On the function origin, only function answers: the dashboard and the management
    API are the other origin's (a 404 saying so)."""
    if on_function_origin(request) and not served_on_function_origin(request.path):
        raise NotFound(f"{request.path} is not served on the function origin, which "
                       "serves function URLs (/fn/...) and invocation results only; "
                       "the dashboard and the API are on the gateway's port",
                       field="path")
    response: web.StreamResponse = await handler(request)
    return response
