"""Recent traces of invocations, from this gateway replica's ring (gateway/tracing.py):
`GET /v1/traces?function=&limit=` lists them newest first, `GET /v1/traces/{trace_id}`
gives one with its spans (the dashboard draws it as a waterfall). A tenant sees its
own; the operator sees every tenant's. docs/tracing.md."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from thaw.core.errors import InvalidArgument, NotFound
from thaw.gateway import tracing
from thaw.gateway.auth import is_operator
from thaw.gateway.caller import principal_of, require_logs
from thaw.gateway.openapi import _errors
from thaw.gateway.state import CONFIG_KEY

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_FUNCTION = re.compile(r"^([a-z0-9][a-z0-9-]{0,62}/)?[a-z0-9][a-z0-9-]{0,62}$")


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw)
    except ValueError:
        raise InvalidArgument("limit must be an integer", field="limit") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(f"limit must be in [1, {MAX_LIMIT}]", field="limit")
    return limit


async def _reader(request: web.Request) -> tuple[str | None, str]:
    """(the tenant whose traces the caller may read, None for all; its own tenant).
    Traces carry what handlers put in their spans: the logs' scopes."""
    p = await principal_of(request)
    require_logs(p)
    operator = is_operator(p, request.app[CONFIG_KEY])
    return (None if operator else p.tenant), p.tenant


async def list_traces(request: web.Request) -> web.Response:
    tenant, own = await _reader(request)
    limit = _limit(request)
    function = request.query.get("function") or None
    if function is not None:
        if not _FUNCTION.match(function):
            raise InvalidArgument("function must be a name (or tenant/name)",
                                  field="function")
        if "/" not in function:
            function = f"{own}/{function}"
    traces = tracing.sink().ring.recent(tenant, function, limit)
    return web.json_response({"traces": [t.summary() for t in traces]})


async def get_trace(request: web.Request) -> web.Response:
    tenant, _ = await _reader(request)
    trace_id = request.match_info["trace_id"]
    if not _TRACE_ID.match(trace_id):
        raise InvalidArgument("trace_id must be 32 lower-case hex digits", field="trace_id")
    trace = tracing.sink().ring.get(trace_id)
    if trace is None or (tenant is not None and trace.tenant != tenant):
        # Another tenant's trace reads as a missing one.
        raise NotFound(f"trace {trace_id} not found (this gateway keeps the last "
                       f"{tracing.sink().ring.capacity})", field="trace_id")
    return web.json_response(trace.as_json())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/traces", list_traces)
    app.router.add_get("/v1/traces/{trace_id}", get_trace)


_SPAN = {"type": "object", "properties": {
    "name": {"type": "string"}, "span_id": {"type": "string"},
    "parent_id": {"type": ["string", "null"]}, "start_ns": {"type": "integer"},
    "end_ns": {"type": "integer"}, "duration_ms": {"type": "number"},
    "component": {"type": "string", "enum": ["gateway", "scheduler", "agent", "instance"]},
    "kind": {"type": "string"}, "attributes": {"type": "object"},
    "error": {"type": ["string", "null"]}}}
_SUMMARY: dict[str, Any] = {"type": "object", "properties": {
    "trace_id": {"type": "string"}, "function": {"type": "string"},
    "start_ns": {"type": "integer"}, "duration_ms": {"type": "number"},
    "spans": {"type": "integer"}, "start": {"type": ["string", "null"]},
    "error": {"type": ["string", "null"]}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/v1/traces": {"get": {
        "summary": "Recent traces of invocations (this gateway replica's last "
                   "THAW_TRACES_KEPT), newest first.",
        "parameters": [
            {"name": "function", "in": "query",
             "schema": {"type": "string", "pattern": _FUNCTION.pattern}},
            {"name": "limit", "in": "query", "schema": {
                "type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                "default": DEFAULT_LIMIT}},
        ],
        "responses": {
            "200": {"description": "The traces' summaries.", "content": {
                "application/json": {"schema": {"type": "object", "properties": {
                    "traces": {"type": "array", "items": _SUMMARY}}}}}},
            **_errors(400, 401, 403),
        },
    }},
    "/v1/traces/{trace_id}": {"get": {
        "summary": "One trace with its spans (gateway, scheduler, agent, instance).",
        "parameters": [
            {"name": "trace_id", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": _TRACE_ID.pattern}},
        ],
        "responses": {
            "200": {"description": "The trace.", "content": {"application/json": {
                "schema": {"type": "object", "properties": {
                    "trace_id": {"type": "string"}, "function": {"type": "string"},
                    "tenant": {"type": "string"},
                    "spans": {"type": "array", "items": _SPAN}}}}}},
            **_errors(400, 401, 403, 404),
        },
    }},
}
