"""Function versions over HTTP: every deploy is an immutable version
(scheduler/versions.py); list them, and roll back to a kept one.

- `GET /v1/functions/{name}/versions`: every version, newest first, with which serves.
- `POST /v1/functions/{name}/rollback` (scope `deploy`), JSON body optional
  `{"version": N}` (default: the newest ready version before the active one). Instant
  when that version's snapshot is kept; else its snapshot is rebuilt from its stored
  bundle first (the active version serves meanwhile) and the answer says so.

Invocation answers carry `X-Thaw-Version` (gateway/relay.py): the version that
answered.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from thaw.core.errors import InvalidArgument
from thaw.core.grpcutil import call
from thaw.gateway.auth import require
from thaw.gateway.caller import principal_of
from thaw.gateway.state import GATEWAY_KEY
from thaw.gateway.views import function_json, version_json
from thaw.proto import scheduler_pb2, scheduler_pb2_grpc

# Versions are numbered from 1; a rollback target past this is a typo, not a version.
MAX_VERSION = 2**31 - 1
# Listing is a DB read; a rollback may rebuild a snapshot (like a deploy that waits).
LIST_TIMEOUT = 30.0
ROLLBACK_TIMEOUT = 1800.0


def _stub(request: web.Request) -> scheduler_pb2_grpc.SchedulerStub:
    return scheduler_pb2_grpc.SchedulerStub(request.app[GATEWAY_KEY].scheduler.channel)


async def list_versions(request: web.Request) -> web.Response:
    p = await principal_of(request)
    require(p, "deploy")
    name = request.match_info["name"]
    reply = await call(_stub(request).ListVersions(
        scheduler_pb2.FunctionRequest(tenant=p.tenant, name=name), timeout=LIST_TIMEOUT))
    return web.json_response({
        "name": name, "active_version": reply.active_version or None,
        "versions": [version_json(v) for v in reply.versions]})


async def rollback_target(request: web.Request) -> int:
    """The body's version, 0 when none is given (the previous ready version)."""
    raw = await request.read()
    if not raw.strip():
        return 0
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the body is not JSON: {exc}", field="body") from exc
    if not isinstance(body, dict):
        raise InvalidArgument('the body must be a JSON object like {"version": 2}',
                              field="body")
    version = body.get("version")
    if version is None:
        return 0
    if isinstance(version, bool) or not isinstance(version, int) or not (
            1 <= version <= MAX_VERSION):
        raise InvalidArgument(f"version must be a version number (an integer from 1), "
                              f"got {version!r}", field="version")
    return version


async def rollback(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    p = await principal_of(request)
    require(p, "deploy")
    name = request.match_info["name"]
    version = await rollback_target(request)
    reply = await call(_stub(request).Rollback(
        scheduler_pb2.RollbackRequest(tenant=p.tenant, name=name, version=version),
        timeout=ROLLBACK_TIMEOUT))
    # This replica's kept leases of the version switched out go now.
    gw.leases.forget_function(f"{p.tenant}/{name}")
    fn = reply.function
    return web.json_response({
        "name": name, "version": fn.active_version, "rebuilt": reply.rebuilt,
        "message": reply.message, "function": function_json(request, fn)})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/functions/{name}/versions", list_versions)
    app.router.add_post("/v1/functions/{name}/rollback", rollback)


_NAME_PARAM = {"name": "name", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}}
_ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


VERSION_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["version", "state", "active"], "properties": {
        "version": {"type": "integer"},
        "state": {"type": "string", "enum": ["building", "ready", "failed"]},
        "reason": {"type": "string"}, "active": {"type": "boolean"},
        "bundle_digest": {"type": "string"}, "handler": {"type": "string"},
        "start_mode": {"type": "string"},
        "snapshot": {"type": "string", "nullable": True,
                     "enum": ["ready", "building", "failed", "quarantined", "collected",
                              None]},
        "snapshot_bytes": {"type": "integer"}, "created_at": {"type": "number"},
        "activated_at": {"type": "number", "nullable": True},
        "config": {"type": "object"}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/v1/functions/{name}/versions": {"get": {
        "summary": "Every version of a function (one per deploy), newest first",
        "parameters": [_NAME_PARAM],
        "responses": {
            "200": {"description": "The versions.", "content": {"application/json": {
                "schema": {"type": "object", "required": ["name", "versions"],
                           "properties": {
                               "name": {"type": "string"},
                               "active_version": {"type": "integer", "nullable": True},
                               "versions": {"type": "array", "items": VERSION_SCHEMA}}}}}},
            "400": _error("The request is malformed; `field` names the part at fault."),
            "401": _error("No API key, or an unknown one."),
            "404": _error("No such function for this key's tenant.")}}},
    "/v1/functions/{name}/rollback": {"post": {
        "summary": "Serve an earlier version again (instant when its snapshot is kept, "
                   "else rebuilt from its bundle first)",
        "parameters": [_NAME_PARAM],
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"version": {
                "type": "integer", "minimum": 1, "maximum": MAX_VERSION,
                "description": "Default: the newest ready version before the active "
                               "one."}}}}}},
        "responses": {
            "200": {"description": "The version now serving.", "content": {
                "application/json": {"schema": {
                    "type": "object",
                    "required": ["name", "version", "rebuilt", "message", "function"],
                    "properties": {
                        "name": {"type": "string"}, "version": {"type": "integer"},
                        "rebuilt": {"type": "boolean"}, "message": {"type": "string"},
                        "function": {"$ref": "#/components/schemas/Function"}}}}}},
            "400": _error("Not a version number, or a version that failed or is "
                          "building (`field` is `version`), or no earlier ready version."),
            "401": _error("No API key, or an unknown one."),
            "403": _error("The API key lacks the deploy scope."),
            "404": _error("No such function, or no such version of it."),
            "503": _error("Rebuilding the version's collected snapshot failed; the "
                          "active version still serves.")}}},
}
