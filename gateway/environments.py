"""Per-function Python environments on the nodes, for operators (`thaw env ls|gc`):
GET /v1/nodes/environments lists each node's environments (key, Python, packages,
size, the functions that used it, last used); POST /v1/nodes/environments/gc removes
those nothing in use runs in, then lists what is left. Both take `?node=ID` for one
node. docs/environments.md."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from thaw.core.grpcutil import call
from thaw.gateway.auth import require_operator
from thaw.gateway.caller import principal_of
from thaw.gateway.openapi import _errors, _json
from thaw.gateway.state import GATEWAY_KEY
from thaw.proto import scheduler_pb2, scheduler_pb2_grpc

# A collection removes folders on each node in turn (scheduler/environments.py's bound).
ENVIRONMENTS_TIMEOUT_SECONDS = 900.0


def node_environments_json(n: scheduler_pb2.NodeEnvironments) -> dict[str, Any]:
    return {"node": n.node_id, "error": n.error, "removed": list(n.removed),
            "freed_bytes": n.freed_bytes, "environments": [
                {"key": e.key, "python": e.python, "packages": e.packages,
                 "size_bytes": e.size_bytes, "source": e.source,
                 "functions": list(e.functions), "last_used": e.last_used,
                 "in_use": e.in_use} for e in n.environments]}


async def _environments(request: web.Request, collect: bool) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    require_operator(await principal_of(request), gw.config)
    stub = scheduler_pb2_grpc.SchedulerStub(gw.scheduler.channel)
    reply = await call(stub.NodeEnvironments(scheduler_pb2.NodeEnvironmentsRequest(
        node_id=request.query.get("node", ""), collect=collect),
        timeout=ENVIRONMENTS_TIMEOUT_SECONDS))
    return web.json_response({"nodes": [node_environments_json(n) for n in reply.nodes]})


async def list_environments(request: web.Request) -> web.Response:
    """Each node's environments (operator)."""
    return await _environments(request, collect=False)


async def collect_environments(request: web.Request) -> web.Response:
    """Remove the environments nothing uses on each node, then list (operator)."""
    return await _environments(request, collect=True)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/nodes/environments", list_environments)
    app.router.add_post("/v1/nodes/environments/gc", collect_environments)


_NODE_QUERY = {"name": "node", "in": "query", "required": False,
               "schema": {"type": "string"}, "description": "One node; default: every one."}
_ENVIRONMENTS = {"type": "object", "properties": {"nodes": {"type": "array", "items": {
    "type": "object", "properties": {
        "node": {"type": "string"}, "error": {"type": "string"},
        "removed": {"type": "array", "items": {"type": "string"}},
        "freed_bytes": {"type": "integer"},
        "environments": {"type": "array", "items": {"type": "object", "properties": {
            "key": {"type": "string"}, "python": {"type": "string"},
            "packages": {"type": "integer"}, "size_bytes": {"type": "integer"},
            "source": {"type": "string"},
            "functions": {"type": "array", "items": {"type": "string"}},
            "last_used": {"type": "number"}, "in_use": {"type": "boolean"}}}}}}}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/v1/nodes/environments": {"get": {
        "summary": "Each node's per-function Python environments (operator): key, "
                   "Python, packages, size, functions that used it, last used.",
        "parameters": [_NODE_QUERY],
        "responses": {"200": _json(_ENVIRONMENTS, "Each node's environments."),
                      **_errors(401, 403, 404, 503)}}},
    "/v1/nodes/environments/gc": {"post": {
        "summary": "Remove the environments no kept snapshot, instance, build or "
                   "template uses (operator), then list what each node keeps.",
        "parameters": [_NODE_QUERY],
        "responses": {"200": _json(_ENVIRONMENTS, "What each node removed and keeps."),
                      **_errors(401, 403, 404, 503)}}},
}
