"""The tenant's secrets over HTTP (the scheduler's Secrets service stores them,
encrypted; docs/secrets.md):

- `PUT /v1/secrets/{name}` {"value": "..."}: create or replace (201 / 200). A new
  value drains the running instances of the functions that use it (and this
  replica's kept leases on them); the answer names those functions and how many
  instances.
- `GET /v1/secrets`: names, times and versions; never a value.
- `DELETE /v1/secrets/{name}[?force=true]`: 409 naming the functions whose thaw.toml
  lists it, unless forced.

A key with the `deploy` scope of the tenant (whoever may deploy may read any secret
from a function anyway); the operator may name another tenant with `?tenant=`. The
audit log records `secret.set` and `secret.delete` with the name as target (its
middleware, gateway/audit.py); no answer, log line or entry holds a value.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from thaw.core.errors import AlreadyExists, InvalidArgument
from thaw.core.grpcutil import call
from thaw.gateway.auth import require, require_operator
from thaw.gateway.caller import principal_of
from thaw.gateway.openapi import JSON, _errors, _json
from thaw.gateway.state import CONFIG_KEY, GATEWAY_KEY
from thaw.gateway.tenancy import ACTED_ON_KEY
from thaw.proto import scheduler_pb2, secrets_pb2, secrets_pb2_grpc

# One DB write and, on a rotation, instances told to stop (they stop in background).
SECRETS_TIMEOUT = 30.0
# Answers about secrets are never cached anywhere on the way.
NO_STORE = {"Cache-Control": "no-store"}
TRUE = ("1", "true", "yes")


class SecretInUse(AlreadyExists):
    """Deleting a secret that functions' thaw.toml lists (409; `force` deletes anyway)."""

    code = "secret_in_use"


def _stub(request: web.Request) -> secrets_pb2_grpc.SecretsStub:
    return secrets_pb2_grpc.SecretsStub(request.app[GATEWAY_KEY].scheduler.channel)


async def _acting(request: web.Request, scope: str) -> str:
    """The tenant acted on: the key's own, or (operator only) the one `?tenant=` names."""
    p: scheduler_pb2.Principal = await principal_of(request)
    require(p, scope)
    tenant = request.query.get("tenant")
    if tenant is None or tenant == p.tenant:
        return p.tenant
    require_operator(p, request.app[CONFIG_KEY])
    request[ACTED_ON_KEY] = tenant
    return tenant


def info_json(info: secrets_pb2.SecretInfo) -> dict[str, Any]:
    return {"name": info.name, "created_at": info.created_at,
            "updated_at": info.updated_at, "version": info.version}


async def _value_of(request: web.Request) -> str:
    """The body's `value` (the body was read and bounded by gateway/jsonbody.py)."""
    if not request.can_read_body:
        raise InvalidArgument('send the value as JSON: {"value": "..."}', field="value")
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidArgument("the body must be a JSON object", field="body") from exc
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object", field="body")
    unknown = sorted(set(body) - {"value"})
    if unknown:
        raise InvalidArgument(f"unknown field {unknown[0]!r}: the body is "
                              '{"value": "..."}', field=unknown[0])
    value = body.get("value")
    if not isinstance(value, str):
        raise InvalidArgument("value must be a string", field="value")
    return value


async def set_secret(request: web.Request) -> web.Response:
    tenant = await _acting(request, "deploy")
    value = await _value_of(request)
    reply = await call(_stub(request).Set(secrets_pb2.SetSecretRequest(
        tenant=tenant, name=request.match_info["name"], value=value),
        timeout=SECRETS_TIMEOUT))
    if reply.info.version > 1:
        # Leases kept here would keep calling the drained instances (old value) until
        # released; other replicas let theirs go within lease_max_age.
        for name in reply.functions:
            request.app[GATEWAY_KEY].leases.forget_function(f"{tenant}/{name}")
    return web.json_response(
        {**info_json(reply.info), "functions": list(reply.functions),
         "drained": reply.drained},
        status=201 if reply.info.version == 1 else 200, headers=NO_STORE)


async def list_secrets(request: web.Request) -> web.Response:
    tenant = await _acting(request, "deploy")
    reply = await call(_stub(request).List(secrets_pb2.ListSecretsRequest(tenant=tenant),
                                           timeout=SECRETS_TIMEOUT))
    return web.json_response({"secrets": [info_json(i) for i in reply.secrets]},
                             headers=NO_STORE)


async def delete_secret(request: web.Request) -> web.Response:
    tenant = await _acting(request, "deploy")
    name = request.match_info["name"]
    force = request.query.get("force", "").lower() in TRUE
    reply = await call(_stub(request).Delete(secrets_pb2.DeleteSecretRequest(
        tenant=tenant, name=name, force=force), timeout=SECRETS_TIMEOUT))
    if not reply.deleted:
        used = ", ".join(reply.used_by)
        raise SecretInUse(f"secret {name!r} is used by {used}: remove it from their "
                          "thaw.toml and deploy, or delete with force (their new "
                          "instances then fail to start)", field="name")
    return web.json_response({"name": name, "deleted": True,
                              "used_by": list(reply.used_by)}, headers=NO_STORE)


def add_routes(app: web.Application) -> None:
    app.router.add_put("/v1/secrets/{name}", set_secret)
    app.router.add_get("/v1/secrets", list_secrets)
    app.router.add_delete("/v1/secrets/{name}", delete_secret)


SECRET_NAME = {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"}
_NAME_PARAM = {"name": "name", "in": "path", "required": True, "schema": SECRET_NAME}
_TENANT_PARAM = {"name": "tenant", "in": "query", "required": False,
                 "schema": {"type": "string"},
                 "description": "The operator only: act on this tenant's secrets."}
SECRET_INFO: dict[str, Any] = {"type": "object", "properties": {
    "name": SECRET_NAME, "created_at": {"type": "number"},
    "updated_at": {"type": "number"},
    "version": {"type": "integer", "description": "How many times it was set."}}}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/secrets": {"get": {
        "summary": "The tenant's secrets: names and times, never values.",
        "parameters": [_TENANT_PARAM],
        "responses": {"200": _json({"type": "object", "properties": {
            "secrets": {"type": "array", "items": SECRET_INFO}}}, "The secrets."),
            **_errors(400, 401, 403)}}},
    "/v1/secrets/{name}": {
        "put": {
            "summary": "Set a secret (encrypted at rest). A new value stops the running "
                       "instances of the functions that use it; their next instances "
                       "get it (on_restore sees it).",
            "parameters": [_NAME_PARAM, _TENANT_PARAM],
            "requestBody": {"required": True, "content": {JSON: {"schema": {
                "type": "object", "required": ["value"], "additionalProperties": False,
                "properties": {"value": {"type": "string", "maxLength": 65536}}}}}},
            "responses": {
                "200": _json({**SECRET_INFO, "properties": {
                    **SECRET_INFO["properties"],
                    "functions": {"type": "array", "items": {"type": "string"}},
                    "drained": {"type": "integer"}}}, "Replaced; never the value."),
                "201": {"description": "Created (the same fields)."},
                **_errors(400, 401, 403, 413, 429)}},
        "delete": {
            "summary": "Delete a secret; refused (409) while functions use it, unless "
                       "force.",
            "parameters": [_NAME_PARAM, _TENANT_PARAM,
                           {"name": "force", "in": "query", "required": False,
                            "schema": {"type": "boolean"}}],
            "responses": {
                "200": _json({"type": "object", "properties": {
                    "name": SECRET_NAME, "deleted": {"type": "boolean"},
                    "used_by": {"type": "array", "items": {"type": "string"}}}},
                    "Deleted."),
                **_errors(400, 401, 403, 404),
                "409": _json({"$ref": "#/components/schemas/Error"},
                             "Functions use it (the message names them); delete with "
                             "force.")}},
    },
}
