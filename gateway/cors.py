"""Cross-origin access to function URLs, as each function's thaw.toml `[http]` table
says (core/http_spec.py, docs/thaw-toml.md).

For a function with `cors_origins`:
- a preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered
  here, without an API key and without reaching an instance: 204 with the allowed
  methods and headers when the origin, method and headers are allowed, else 403
  `cors_refused` naming what is not (and no Access-Control-Allow-Origin);
- every answer to a call with an allowed Origin carries
  `Access-Control-Allow-Origin: <that origin>` (never `*`, so credentials can be
  allowed safely) and `Vary: Origin`; a refused origin gets `Vary: Origin` only.
A function without `cors_origins` gets no CORS headers, and its OPTIONS calls reach
its handler.

`check(request, gw, tenant, name)` is called first by the function URL's route: it
answers preflights and notes the headers the answer must carry in the request
(CORS_HEADERS_KEY), which `add_headers` (aiohttp's on_response_prepare, `install`)
copies onto the answer, errors included. The fast lane (gateway/lane.py) leaves every
call with an Origin header to aiohttp. Only calls with an Origin header (browsers)
look the policy up, in the function's cached knobs the call reads anyway
(gateway/priority.py: one scheduler look per function per DEFAULT_CACHE_SECONDS).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from aiohttp import web

from thaw.core.errors import NotFound, ThawError
from thaw.core.http_spec import Http
from thaw.gateway.errors import error_body
from thaw.gateway.priority import function_knobs
from thaw.gateway.state import Gateway

CORS_HEADERS_KEY = web.RequestKey("cors_headers", dict)
"""Headers the answer to this request must carry (set by check)."""


class _Refused(ThawError):
    """A preflight the function's [http] table does not allow (403)."""

    code = "cors_refused"


def origin_allowed(policy: Http, origin: str) -> bool:
    return "*" in policy.cors_origins or origin.lower() in policy.cors_origins


def _asked_headers(request_headers: str) -> list[str]:
    return [h.strip() for h in request_headers.split(",") if h.strip()]


def preflight_refusal(policy: Http, origin: str, method: str, asked: str) -> ThawError | None:
    """Why a preflight is refused (the error names origin, method or headers), or None."""
    if not origin_allowed(policy, origin):
        return _Refused(f"origin {origin} may not call this function", field="origin")
    if method.upper() not in policy.cors_methods:
        return _Refused(f"method {method} is not allowed across origins (allowed: "
                        f"{', '.join(policy.cors_methods)})", field="method")
    if "*" not in policy.cors_headers:
        allowed = {h.lower() for h in policy.cors_headers}
        for name in _asked_headers(asked):
            if name.lower() not in allowed:
                return _Refused(f"header {name} is not allowed across origins (allowed: "
                                f"{', '.join(policy.cors_headers)})", field="headers")
    return None


def preflight_headers(policy: Http, origin: str, asked: str) -> dict[str, str]:
    """The headers of an allowed preflight's answer."""
    headers = answer_headers(policy, origin)
    headers["Access-Control-Allow-Methods"] = ", ".join(policy.cors_methods)
    allowed = (", ".join(_asked_headers(asked)) if "*" in policy.cors_headers
               else ", ".join(policy.cors_headers))
    if allowed:
        headers["Access-Control-Allow-Headers"] = allowed
    headers["Access-Control-Max-Age"] = str(policy.cors_max_age)
    headers["Vary"] = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    return headers


def answer_headers(policy: Http, origin: str) -> dict[str, str]:
    """The CORS headers of an answer to a call from `origin`."""
    if not origin_allowed(policy, origin):
        return {"Vary": "Origin"}
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if policy.cors_credentials:
        headers["Access-Control-Allow-Credentials"] = "true"
    return headers


async def _policy(request: web.Request, gw: Gateway, tenant: str, name: str
                  ) -> Http | None:
    try:
        return (await function_knobs(request, gw, tenant, name)).cors
    except NotFound:
        return None  # the route answers the 404 (or 401) as usual


async def check(request: web.Request, gw: Gateway, tenant: str, name: str
                ) -> web.Response | None:
    """A preflight's answer (the call goes no further), or None: the call proceeds,
    and its answer will carry the CORS headers noted in the request."""
    origin = request.headers.get("Origin")
    if not origin:
        return None
    policy = await _policy(request, gw, tenant, name)
    if policy is None:
        return None
    method = request.headers.get("Access-Control-Request-Method")
    if request.method == "OPTIONS" and method:
        asked = request.headers.get("Access-Control-Request-Headers", "")
        refusal = preflight_refusal(policy, origin, method, asked)
        if refusal is not None:
            return web.json_response(error_body(refusal.code, refusal.message, refusal.field),
                                     status=403, headers={"Vary": "Origin"})
        return web.Response(status=204, headers=preflight_headers(policy, origin, asked))
    request[CORS_HEADERS_KEY] = answer_headers(policy, origin)
    return None


def add_headers(request: MutableMapping[Any, Any], headers: MutableMapping[str, str]
                ) -> None:
    """Copy the CORS headers `check` noted onto an answer's headers (a Vary the answer
    already has is extended, not replaced)."""
    noted: dict[str, str] | None = request.get(CORS_HEADERS_KEY)
    if not noted:
        return
    for header, value in noted.items():
        if header == "Vary" and headers.get("Vary"):
            present = {v.strip().lower() for v in headers["Vary"].split(",")}
            if value.lower() not in present:
                headers["Vary"] = f"{headers['Vary']}, {value}"
            continue
        headers[header] = value


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp's answers (the fast lane leaves calls with an Origin to aiohttp)."""
    add_headers(request, response.headers)


def install(app: web.Application) -> None:
    """The CORS headers on every answer aiohttp prepares."""
    app.on_response_prepare.append(on_response_prepare)
