"""`GET /v1/schedules[?function=NAME]`: the tenant's cron schedules (docs/schedules.md),
each with its next due time and how its last due time went (its run's id and state),
from the scheduler's schedules table. Any key of the tenant reads them, as it reads
the functions that declare them."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from thaw.core.grpcutil import call
from thaw.gateway.caller import principal_of
from thaw.gateway.openapi import _errors, _json
from thaw.gateway.state import GATEWAY_KEY
from thaw.proto import invocations_pb2, invocations_pb2_grpc

# A metadata read at the scheduler.
SCHEDULES_TIMEOUT_SECONDS = 30.0


def _time(value: float) -> float | None:
    return value or None


def schedule_json(s: invocations_pb2.Schedule) -> dict[str, Any]:
    return {
        "id": s.id, "function": s.function, "position": s.position, "cron": s.cron,
        "timezone": s.timezone, "enabled": s.enabled, "input": json.loads(s.input_json),
        "next_run_at": _time(s.next_run_at), "last_due_at": _time(s.last_due_at),
        "last_run_at": _time(s.last_run_at), "last_outcome": s.last_outcome or None,
        "last_invocation_id": s.last_invocation_id or None,
        "last_invocation_url": f"/v1/invocations/{s.last_invocation_id}"
        if s.last_invocation_id else None,
    }


async def list_schedules(request: web.Request) -> web.Response:
    p = await principal_of(request)
    stub = invocations_pb2_grpc.InvocationsStub(request.app[GATEWAY_KEY].scheduler.channel)
    reply = await call(stub.ListSchedules(invocations_pb2.ListSchedulesRequest(
        tenant=p.tenant, function=request.query.get("function", "")),
        timeout=SCHEDULES_TIMEOUT_SECONDS))
    return web.json_response({"schedules": [schedule_json(s) for s in reply.schedules]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/schedules", list_schedules)


_TIME = {"type": ["number", "null"], "description": "Unix seconds; null = none."}
_SCHEDULES = {"type": "object", "properties": {"schedules": {"type": "array", "items": {
    "type": "object", "properties": {
        "id": {"type": "string"}, "function": {"type": "string"},
        "position": {"type": "integer"}, "cron": {"type": "string"},
        "timezone": {"type": "string"}, "enabled": {"type": "boolean"}, "input": {},
        "next_run_at": _TIME, "last_due_at": _TIME, "last_run_at": _TIME,
        "last_outcome": {"type": ["string", "null"], "enum": [
            None, "skipped", "refused", "queued", "running", "succeeded", "failed",
            "cancelled", "expired"]},
        "last_invocation_id": {"type": ["string", "null"]},
        "last_invocation_url": {"type": ["string", "null"]}}}}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/v1/schedules": {"get": {
        "summary": "The tenant's cron schedules ([schedule] in thaw.toml): cron, time "
                   "zone, input, next run, and the last due time's outcome (skipped, "
                   "refused, or its run's status) with that run's id.",
        "parameters": [{"name": "function", "in": "query", "required": False,
                        "schema": {"type": "string"},
                        "description": "One function's; default: every function's."}],
        "responses": {"200": _json(_SCHEDULES, "The schedules, by function and position."),
                      **_errors(401, 503)}}},
}
