"""Invocation priority over HTTP.

An invocation's priority (1-100) decides its place among the calls waiting for a busy
function: higher first, FIFO among equals, and waiting raises it (aging, the
starvation guard: THAW_PRIORITY_AGING_RATE levels per second). It is, first found:
- the `X-Thaw-Priority` header (an integer 1-100; above the key's `priority_max` -> 403);
- the function's default (`PATCH /v1/functions/{name}` {"priority": n | null});
- the key's `priority_default`.

`POST /v1/invocations/{id}/priority` {"priority": n}: an admin key moves a queued
invocation (its request id) ahead, or back; 404 once it is not waiting any more. The
call may wait in this gateway (for a lease another call of the function gives back)
and at the scheduler (for a free slot or a new instance): both queues are reordered.

The same per-function cache holds the function's request body limit (thaw.toml
`[limits] max_body`), so that a function URL refuses a body past it (413) before
reading it, with no scheduler round trip per call (`body_limit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cachetools import TTLCache

from thaw.core.errors import InvalidArgument, NotFound, PermissionDenied
from thaw.core.http_spec import Http, policy_of
from thaw.core.priority import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN, valid_priority
from thaw.gateway.auth import is_operator, require
from thaw.gateway.caller import principal_of
from thaw.gateway.errors import PayloadTooLarge
from thaw.gateway.fnconfig import config_of
from thaw.gateway.openapi import JSON, _errors, _json
from thaw.gateway.scheduler_client import SchedulerClient
from thaw.gateway.state import CONFIG_KEY, GATEWAY_KEY, Gateway
from thaw.proto import scheduler_pb2

PRIORITY_HEADER = "X-Thaw-Priority"
# A function's defaults (priority, body limit) are cached this long per replica (a
# PATCH through this replica updates them at once; through another, or a redeploy,
# within this).
DEFAULT_CACHE_SECONDS = 10.0
DEFAULT_CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class FunctionKnobs:
    """What the gateway needs of a function before it reads an invocation's body."""

    priority: int | None
    """The function's default priority; None: the key's."""
    max_body: int
    """Its thaw.toml `limits.max_body` in bytes; 0: the gateway's max_body_bytes."""
    input_schema: str = ""
    """Its active version's input schema (JSON text, gateway/inputs.py); "": none."""
    cors: Http | None = None
    """Its CORS policy (`[http]`, gateway/cors.py); None: no CORS headers."""


def knobs_of(fn: scheduler_pb2.FunctionInfo) -> FunctionKnobs:
    try:
        max_body = config_of(fn.config_json).max_body
    except ValueError:
        max_body = 0  # a config this gateway cannot read: the gateway's limit holds
    return FunctionKnobs(priority=fn.priority or None, max_body=max_body,
                         input_schema=fn.input_schema, cors=policy_of(fn.config_json))


class FunctionDefaults:
    """tenant/name -> the function's knobs, cached so that invoking makes no extra
    scheduler round trip (one lookup per function per DEFAULT_CACHE_SECONDS)."""

    def __init__(self) -> None:
        self._cache: TTLCache[str, FunctionKnobs] = TTLCache(
            maxsize=DEFAULT_CACHE_ENTRIES, ttl=DEFAULT_CACHE_SECONDS)

    async def get(self, scheduler: SchedulerClient, tenant: str, name: str
                  ) -> FunctionKnobs:
        key = f"{tenant}/{name}"
        knobs = self._cache.get(key)
        if knobs is not None:
            return knobs
        fn = await scheduler.get_function(tenant, name)
        return self.remember(fn)

    def forget(self, tenant: str, name: str) -> None:
        """Read the function's knobs again on its next call."""
        self._cache.pop(f"{tenant}/{name}", None)

    def remember(self, fn: scheduler_pb2.FunctionInfo) -> FunctionKnobs:
        knobs = knobs_of(fn)
        self._cache[f"{fn.tenant}/{fn.name}"] = knobs
        return knobs


DEFAULTS_KEY = web.AppKey("function_priorities", FunctionDefaults)


# For an app built without this module's routes (a test's bare gateway).
_UNREGISTERED = FunctionDefaults()


def _defaults(app: web.Application) -> FunctionDefaults:
    return app.get(DEFAULTS_KEY) or _UNREGISTERED


def forget_function(app: web.Application, tenant: str, name: str) -> None:
    """The function's cached knobs are stale (its first fresh start has just taught
    the scheduler its input schema): the next call reads them again."""
    _defaults(app).forget(tenant, name)


def header_priority(request: web.Request, p: scheduler_pb2.Principal) -> int | None:
    """The priority the request asks for, checked against the key's range; None
    when it asks for none."""
    raw = request.headers.get(PRIORITY_HEADER)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise InvalidArgument(f"{PRIORITY_HEADER} must be an integer from {PRIORITY_MIN} "
                              f"to {PRIORITY_MAX}, got {raw!r}", field=PRIORITY_HEADER)
    allowed = p.priority_max or PRIORITY_MAX
    if value > allowed:
        raise PermissionDenied(
            f"{PRIORITY_HEADER}: {value} is above what this API key may ask for; its "
            f"allowed range is {PRIORITY_MIN}-{allowed}", field=PRIORITY_HEADER)
    return value


async def call_priority(request: web.Request, gw: Gateway, p: scheduler_pb2.Principal,
                        tenant: str, name: str) -> int:
    """The priority of an invocation of tenant/name by the key `p` (see the module)."""
    asked = header_priority(request, p)
    if asked is not None:
        return asked
    knobs = await _defaults(request.app).get(gw.scheduler, tenant, name)
    return _priority(None, p, knobs)


def remember_function(app: web.Application, fn: scheduler_pb2.FunctionInfo) -> None:
    """Refresh tenant/name's cached knobs from a record just read (a deploy's answer):
    this replica then checks calls against the version now serving at once."""
    _defaults(app).remember(fn)


async def function_knobs(request: web.Request, gw: Gateway, tenant: str, name: str
                         ) -> FunctionKnobs:
    """tenant/name's cached knobs (one scheduler look per DEFAULT_CACHE_SECONDS)."""
    return await _defaults(request.app).get(gw.scheduler, tenant, name)


async def call_knobs(request: web.Request, gw: Gateway, p: scheduler_pb2.Principal,
                     tenant: str, name: str) -> tuple[int, int, str]:
    """An invocation's priority (as `call_priority`) and its body limit (as
    `body_limit`), from one look at the function's cached knobs."""
    asked = header_priority(request, p)
    knobs = await _defaults(request.app).get(gw.scheduler, tenant, name)
    limit, described = _limit(gw, name, knobs)
    return _priority(asked, p, knobs), limit, described


def _priority(asked: int | None, p: scheduler_pb2.Principal, knobs: FunctionKnobs) -> int:
    if asked is not None:
        return asked
    if knobs.priority is not None:
        return knobs.priority
    return p.priority_default or PRIORITY_DEFAULT


async def body_limit(request: web.Request, gw: Gateway, tenant: str, name: str
                     ) -> tuple[int, str]:
    """The largest body an invocation of tenant/name may send, and how a 413 names
    it: the function's `limits.max_body`, capped by the gateway's max_body_bytes."""
    return _limit(gw, name, await _defaults(request.app).get(gw.scheduler, tenant, name))


def _limit(gw: Gateway, name: str, knobs: FunctionKnobs) -> tuple[int, str]:
    gateway_limit = gw.config.max_body_bytes
    own = knobs.max_body
    if own and own < gateway_limit:
        return own, f"function {name}'s limit of {own} bytes (limits.max_body)"
    return gateway_limit, f"this gateway's limit of {gateway_limit} bytes (max_body_bytes)"


async def check_body_size(request: web.Request, gw: Gateway, tenant: str, name: str,
                          size: int) -> None:
    """413 when a body already read (the OpenAI routes learn the function from it) is
    past the function's limit."""
    limit, described = await body_limit(request, gw, tenant, name)
    if size > limit:
        raise PayloadTooLarge(f"the request body is larger than {described}", field="body")


def parse_function_priority(value: object) -> int | None:
    """The `priority` of a function PATCH: 1-100, or null to clear."""
    if value is None:
        return None
    if not isinstance(value, int) or not valid_priority(value):
        raise InvalidArgument(f"priority must be an integer from {PRIORITY_MIN} to "
                              f"{PRIORITY_MAX}, or null for the key's default",
                              field="priority")
    return value


async def set_function_priority(request: web.Request, tenant: str, name: str,
                                value: object) -> scheduler_pb2.FunctionInfo:
    """Apply the `priority` field of `PATCH /v1/functions/{name}` (gateway/tenancy.py
    serves the route; the caller checked the deploy scope)."""
    priority = parse_function_priority(value)
    gw = request.app[GATEWAY_KEY]
    fn = await gw.scheduler.set_function_priority(tenant, name, priority or 0)
    _defaults(request.app).remember(fn)
    return fn


async def raise_invocation(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    p = await principal_of(request)
    require(p, "admin")
    invocation_id = request.match_info["id"]
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError as exc:
        raise InvalidArgument("the body must be a JSON object", field="body") from exc
    if not isinstance(body, dict) or "priority" not in body:
        raise InvalidArgument('send {"priority": <1-100>}', field="priority")
    unknown = sorted(set(body) - {"priority"})
    if unknown:
        raise InvalidArgument(f"unknown field {unknown[0]!r}: settable is priority",
                              field=unknown[0])
    priority = body["priority"]
    if not valid_priority(priority):
        raise InvalidArgument(f"priority must be an integer from {PRIORITY_MIN} to "
                              f"{PRIORITY_MAX}", field="priority")
    # The operator may move any tenant's invocation; a tenant's admin only its own.
    tenant = "" if is_operator(p, request.app[CONFIG_KEY]) else p.tenant
    here = gw.leases.set_priority(invocation_id, priority, tenant)
    answer: dict[str, Any] = {"invocation_id": invocation_id, "priority": priority,
                              "queued_in_gateway": here}
    try:
        resp = await gw.scheduler.set_priority(invocation_id, priority, tenant)
    except NotFound:
        if not here:
            raise NotFound(f"invocation {invocation_id} is not waiting for an instance "
                           "(it was served, finished or never queued)",
                           field="id") from None
        answer.update(function=None, effective_priority=float(priority), ahead=None)
    else:
        answer.update(function=resp.function, effective_priority=resp.effective_priority,
                      ahead=resp.ahead)
    return web.json_response(answer)


def add_routes(app: web.Application) -> None:
    app[DEFAULTS_KEY] = FunctionDefaults()
    app.router.add_post("/v1/invocations/{id}/priority", raise_invocation)


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/invocations/{id}/priority": {"post": {
        "summary": "Re-prioritize a queued invocation (admin)",
        "description": "The invocation's id is its request id (X-Request-ID). It keeps "
                       "the aging of its wait so far; 404 once it waits no more.",
        "parameters": [{"name": "id", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {JSON: {"schema": {
            "type": "object", "required": ["priority"], "properties": {
                "priority": {"type": "integer", "minimum": PRIORITY_MIN,
                             "maximum": PRIORITY_MAX}}}}}},
        "responses": {"200": _json({
            "type": "object", "required": ["invocation_id", "priority"], "properties": {
                "invocation_id": {"type": "string"},
                "priority": {"type": "integer"},
                "function": {"type": "string", "nullable": True},
                "effective_priority": {"type": "number"},
                "ahead": {"type": "integer", "nullable": True,
                          "description": "Calls served before it at the scheduler."},
                "queued_in_gateway": {"type": "boolean"}}}, "The new priority."),
            **_errors(400, 401, 403, 404, 429, 503)}}},
}
