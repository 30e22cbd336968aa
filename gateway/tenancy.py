"""Tenants, API keys and public functions over HTTP (the Tenancy service of
proto/tenancy.proto does the storing).

- `POST/GET /v1/tenants`, `PUT /v1/tenants/{tenant}/quota`: the operator only.
- `POST/GET /v1/keys`, `DELETE /v1/keys/{id}`: an admin key of the tenant (the
  operator may name another tenant with `tenant`). A new key is in the answer to its
  POST and nowhere else, ever.
- `PATCH /v1/functions/{name}` {"public": bool}: a deploy key of the function's tenant.
  A public function is invocable without a key (rate-limited by client address);
  managing it stays with its tenant.

A route where the operator acts on another tenant says which in ACTED_ON_KEY: the
audit log files the entry under that tenant, so its admins see it too.
Revoked keys leave every replica's auth cache within about a second (the
revocation feed, started here: Authenticator.follow_revocations); budgets' day counts
are shared with the other replicas every few seconds (BudgetBook.follow, started here).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from cachetools import TTLCache

from thaw.core.errors import InvalidArgument, PermissionDenied, ThawError
from thaw.core.grpcutil import call
from thaw.core.priority import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN, valid_priority
from thaw.core.units import parse_size
from thaw.gateway.auth import is_operator, require, require_operator
from thaw.gateway.budgets import BUDGETS, budgets_json, parse_budgets
from thaw.gateway.caller import client_address, principal_of
from thaw.gateway.openapi import JSON, NAME, _errors, _json
from thaw.gateway.priority import parse_function_priority, set_function_priority
from thaw.gateway.state import CONFIG_KEY, GATEWAY_KEY, Gateway
from thaw.proto import scheduler_pb2, tenancy_pb2, tenancy_pb2_grpc

META_TIMEOUT = 30.0
# Whether a function is public is cached this long per replica: a function made
# private stops answering anonymous calls within it (at once in the replica that
# served the PATCH).
PUBLIC_CACHE_SECONDS = 2.0
PUBLIC_CACHE_ENTRIES = 10_000
# Polled each second by every replica: quick, or skipped until the next poll.
REVOCATION_TIMEOUT = 5.0
SCOPES = ("invoke", "deploy", "admin")
# Quotas travel as int64 (-1 = no limit).
LIMIT_MAX = 2**63 - 1


class TenancyClient:
    """The gateway's client of the scheduler's Tenancy service; failures raise
    ThawError like SchedulerClient's."""

    def __init__(self, stub: tenancy_pb2_grpc.TenancyStub) -> None:
        self.stub = stub

    async def create_tenant(self, tenant: str) -> tenancy_pb2.TenantInfo:
        return await call(self.stub.CreateTenant(tenancy_pb2.CreateTenantRequest(id=tenant),
                                                 timeout=META_TIMEOUT))

    async def list_tenants(self) -> list[tenancy_pb2.TenantInfo]:
        resp = await call(self.stub.ListTenants(tenancy_pb2.ListTenantsRequest(),
                                                timeout=META_TIMEOUT))
        return list(resp.tenants)

    async def set_quota(self, tenant: str, max_memory_bytes: int | None,
                        max_instances: int | None) -> tenancy_pb2.TenantInfo:
        return await call(self.stub.SetQuota(tenancy_pb2.SetQuotaRequest(
            tenant=tenant, max_memory_bytes=-1 if max_memory_bytes is None else max_memory_bytes,
            max_instances=-1 if max_instances is None else max_instances),
            timeout=META_TIMEOUT))

    async def create_key(self, request: tenancy_pb2.CreateKeyRequest
                         ) -> tenancy_pb2.CreateKeyResponse:
        return await call(self.stub.CreateKey(request, timeout=META_TIMEOUT))

    async def set_budgets(self, tenant: str, key_id: str,
                          budgets: scheduler_pb2.Budgets) -> scheduler_pb2.Budgets:
        return await call(self.stub.SetBudgets(tenancy_pb2.SetBudgetsRequest(
            tenant=tenant, key_id=key_id, budgets=budgets), timeout=META_TIMEOUT))

    async def add_budget_usage(self, counts: list[tenancy_pb2.BudgetCount]
                               ) -> list[tenancy_pb2.BudgetCount]:
        resp = await call(self.stub.AddBudgetUsage(tenancy_pb2.BudgetUsage(counts=counts),
                                                   timeout=REVOCATION_TIMEOUT))
        return list(resp.counts)

    async def list_keys(self, tenant: str) -> list[tenancy_pb2.KeyInfo]:
        resp = await call(self.stub.ListKeys(tenancy_pb2.ListKeysRequest(tenant=tenant),
                                             timeout=META_TIMEOUT))
        return list(resp.keys)

    async def revoke_key(self, tenant: str, key_id: str) -> tenancy_pb2.KeyInfo:
        return await call(self.stub.RevokeKey(
            tenancy_pb2.RevokeKeyRequest(tenant=tenant, id=key_id), timeout=META_TIMEOUT))

    async def set_public(self, tenant: str, name: str, public: bool) -> bool:
        resp = await call(self.stub.SetFunctionPublic(tenancy_pb2.SetFunctionPublicRequest(
            tenant=tenant, name=name, public=public), timeout=META_TIMEOUT))
        return bool(resp.public)

    async def is_public(self, tenant: str, name: str) -> bool:
        resp = await call(self.stub.GetFunctionVisibility(
            tenancy_pb2.FunctionRef(tenant=tenant, name=name), timeout=META_TIMEOUT))
        return bool(resp.public)

    async def revoked_keys(self, since: float) -> tuple[list[str], float]:
        resp = await call(self.stub.RevokedKeys(tenancy_pb2.RevokedKeysRequest(since=since),
                                                timeout=REVOCATION_TIMEOUT))
        return list(resp.key_ids), resp.cursor


class Tenancy:
    """Per replica: the client and the short cache of which functions are public."""

    def __init__(self, client: TenancyClient) -> None:
        self.client = client
        self._public: TTLCache[tuple[str, str], bool] = TTLCache(
            maxsize=PUBLIC_CACHE_ENTRIES, ttl=PUBLIC_CACHE_SECONDS)

    async def is_public(self, tenant: str, name: str) -> bool:
        found = self._public.get((tenant, name))
        if found is None:
            found = await self.client.is_public(tenant, name)
            self._public[(tenant, name)] = found
        return found

    def remember(self, tenant: str, name: str, public: bool) -> None:
        self._public[(tenant, name)] = public


TENANCY_KEY = web.AppKey("tenancy", Tenancy)
ACTED_ON_KEY = web.RequestKey("acted_on_tenant", str)
"""The tenant the operator acted on, when not its own (read by gateway/audit.py)."""


async def anonymous_principal(request: web.Request, gw: Gateway
                              ) -> scheduler_pb2.Principal | None:
    """For a call without Authorization to a public function (/fn/{tenant}/{name}):
    an invoke-only principal of the function's tenant, rate-limited by the caller's
    address. None when the call is not to a public function (the caller then needs a
    key as usual)."""
    tenancy = request.app.get(TENANCY_KEY)
    tenant = request.match_info.get("tenant", "")
    name = request.match_info.get("name", "")
    if tenancy is None or not tenant or not name:
        return None
    try:
        public = await tenancy.is_public(tenant, name)
    except ThawError:
        return None  # the caller gets the usual 401, not a hint
    if not public:
        return None
    address = client_address(request, gw.config.trust_forwarded_for)
    await gw.limiter.check(f"ip:{address}")
    return scheduler_pb2.Principal(tenant=tenant, key_id="", scopes=["invoke"],
                                   priority_default=PRIORITY_DEFAULT,
                                   priority_max=PRIORITY_DEFAULT)


# ---- helpers -------------------------------------------------------------------------

async def _principal(request: web.Request) -> scheduler_pb2.Principal:
    return await principal_of(request)


async def _json_object(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidArgument("the body must be a JSON object", field="body") from exc
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object", field="body")
    return body


def _target_tenant(request: web.Request, p: scheduler_pb2.Principal,
                   given: object = None) -> str:
    """The tenant a key route acts on: the key's own, or (operator only) the one named
    by `tenant` in the body or query."""
    tenant = given if given is not None else request.query.get("tenant")
    if tenant is None or tenant == p.tenant:
        return p.tenant
    if not isinstance(tenant, str):
        raise InvalidArgument("tenant must be a string", field="tenant")
    require_operator(p, request.app[CONFIG_KEY])
    request[ACTED_ON_KEY] = tenant
    return tenant


def _optional_int(body: dict[str, Any], field: str, sizes: bool = False) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if sizes and isinstance(value, str):
        try:
            value = parse_size(value)
        except (ValueError, ThawError) as exc:
            raise InvalidArgument(f"{field}: {exc}", field=field) from exc
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= LIMIT_MAX:
        raise InvalidArgument(f"{field} must be a whole number in [0, {LIMIT_MAX}] or null "
                              "(no limit)", field=field)
    return value


def tenant_json(t: tenancy_pb2.TenantInfo) -> dict[str, Any]:
    return {"id": t.id, "created_at": t.created_at,
            "max_memory_bytes": None if t.max_memory_bytes < 0 else t.max_memory_bytes,
            "max_instances": None if t.max_instances < 0 else t.max_instances,
            "budgets": budgets_json(t.budgets)}


def key_json(k: tenancy_pb2.KeyInfo) -> dict[str, Any]:
    return {"id": k.id, "tenant": k.tenant, "name": k.name, "scopes": list(k.scopes),
            "created_at": k.created_at, "expires_at": k.expires_at or None,
            "revoked_at": k.revoked_at or None, "priority_default": k.priority_default,
            "priority_max": k.priority_max, "budgets": budgets_json(k.budgets)}


# ---- tenants (operator) --------------------------------------------------------------

async def create_tenant(request: web.Request) -> web.Response:
    require_operator(await _principal(request), request.app[CONFIG_KEY])
    body = await _json_object(request)
    tenant = body.get("id")
    if not isinstance(tenant, str):
        raise InvalidArgument("id (the tenant's name) is required", field="id")
    info = await request.app[TENANCY_KEY].client.create_tenant(tenant)
    request[ACTED_ON_KEY] = tenant  # the new tenant's admins see who made it
    max_memory = _optional_int(body, "max_memory_bytes", sizes=True)
    max_instances = _optional_int(body, "max_instances")
    if max_memory is not None or max_instances is not None:
        info = await request.app[TENANCY_KEY].client.set_quota(tenant, max_memory,
                                                               max_instances)
    return web.json_response(tenant_json(info), status=201,
                             headers={"Location": f"/v1/tenants/{tenant}"})


async def list_tenants(request: web.Request) -> web.Response:
    require_operator(await _principal(request), request.app[CONFIG_KEY])
    tenants = await request.app[TENANCY_KEY].client.list_tenants()
    return web.json_response({"tenants": [tenant_json(t) for t in tenants]})


async def set_quota(request: web.Request) -> web.Response:
    """Both limits are set together: one left out (or null) means no limit."""
    require_operator(await _principal(request), request.app[CONFIG_KEY])
    body = await _json_object(request)
    unknown = set(body) - {"max_memory_bytes", "max_instances"}
    if unknown:
        field = sorted(unknown)[0]
        raise InvalidArgument(f"unknown field {field!r}: a quota has max_memory_bytes "
                              "and max_instances", field=field)
    info = await request.app[TENANCY_KEY].client.set_quota(
        request.match_info["tenant"], _optional_int(body, "max_memory_bytes", sizes=True),
        _optional_int(body, "max_instances"))
    return web.json_response(tenant_json(info))


async def set_tenant_budgets(request: web.Request) -> web.Response:
    """PUT /v1/tenants/{tenant}/budgets: all four at once (left out or null: none),
    shared by all the tenant's keys. The operator only: a tenant's admin limits its
    own keys (POST /v1/keys) but not its tenant."""
    require_operator(await _principal(request), request.app[CONFIG_KEY])
    body = await _json_object(request)
    unknown = set(body) - set(BUDGETS)
    if unknown:
        field = sorted(unknown)[0]
        raise InvalidArgument(f"unknown field {field!r}: budgets are "
                              f"{', '.join(BUDGETS)}", field=field)
    tenant = request.match_info["tenant"]
    request[ACTED_ON_KEY] = tenant
    budgets = parse_budgets(body) or scheduler_pb2.Budgets()
    made = await request.app[TENANCY_KEY].client.set_budgets(tenant, "", budgets)
    return web.json_response({"id": tenant, "budgets": budgets_json(made)})


# ---- keys (tenant admin; the operator for any tenant) --------------------------------

async def create_key(request: web.Request) -> web.Response:
    p = await _principal(request)
    require(p, "admin")
    body = await _json_object(request)
    tenant = _target_tenant(request, p, body.get("tenant"))
    scopes = body.get("scopes", ["invoke"])
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise InvalidArgument(f"scopes must be a list of {', '.join(SCOPES)}", field="scopes")
    name = body.get("name", "")
    if not isinstance(name, str):
        raise InvalidArgument("name must be a string", field="name")
    expires_at = body.get("expires_at")
    expires_in = body.get("expires_in")
    if expires_at is not None and expires_in is not None:
        raise InvalidArgument("give expires_at or expires_in, not both", field="expires_in")
    if expires_in is not None:
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) \
                or not 0 < expires_in <= 100 * 365 * 86400:
            raise InvalidArgument("expires_in must be a number of seconds > 0",
                                  field="expires_in")
        expires_at = time.time() + expires_in
    if expires_at is not None and (isinstance(expires_at, bool)
                                   or not isinstance(expires_at, (int, float))
                                   or not 0 < expires_at < 2**53):
        raise InvalidArgument("expires_at must be unix seconds", field="expires_at")
    priorities = {}
    for field in ("priority_default", "priority_max"):
        value = body.get(field)
        if value is None:
            continue
        # A tenant raising its own keys' priority would defeat priorities across
        # tenants: only the operator sets them.
        if not is_operator(p, request.app[CONFIG_KEY]):
            raise PermissionDenied(f"only the platform operator sets {field}", field=field)
        if not valid_priority(value):
            raise InvalidArgument(f"{field} must be in [{PRIORITY_MIN}, {PRIORITY_MAX}]",
                                  field=field)
        priorities[field] = value
    budgets = parse_budgets(body)
    created = await request.app[TENANCY_KEY].client.create_key(tenancy_pb2.CreateKeyRequest(
        tenant=tenant, name=name, scopes=scopes, expires_at=float(expires_at or 0.0),
        budgets=budgets, **priorities))
    return web.json_response({**key_json(created.info), "key": created.key}, status=201,
                             headers={"Location": f"/v1/keys/{created.info.id}",
                                      "Cache-Control": "no-store"})


async def list_keys(request: web.Request) -> web.Response:
    p = await _principal(request)
    require(p, "admin")
    tenant = _target_tenant(request, p)
    keys = await request.app[TENANCY_KEY].client.list_keys(tenant)
    return web.json_response({"keys": [key_json(k) for k in keys]})


async def revoke_key(request: web.Request) -> web.Response:
    p = await _principal(request)
    require(p, "admin")
    tenant = _target_tenant(request, p)
    key_id = request.match_info["id"]
    info = await request.app[TENANCY_KEY].client.revoke_key(tenant, key_id)
    request.app[GATEWAY_KEY].auth.forget_key(key_id)
    return web.json_response(key_json(info))


# ---- functions -----------------------------------------------------------------------

async def update_function(request: web.Request) -> web.Response:
    """PATCH /v1/functions/{name}: the function's settings that are not in its bundle.
    Today `public`; other features add their fields here (one PATCH route only: a
    second module defining PATCH /v1/functions/{name} would fail at startup, so extend
    this handler and FUNCTION_PATCH_SCHEMA instead)."""
    p = await _principal(request)
    require(p, "deploy")
    name = request.match_info["name"]
    body = await _json_object(request)
    unknown = set(body) - {"public", "priority"}
    if unknown:
        field = sorted(unknown)[0]
        raise InvalidArgument(f"unknown field {field!r}: settable are public, priority",
                              field=field)
    if not body:
        raise InvalidArgument("nothing to change: send {\"public\": true|false} and/or "
                              f"{{\"priority\": {PRIORITY_MIN}-{PRIORITY_MAX}|null}}",
                              field="body")
    public = body.get("public")
    if "public" in body and not isinstance(public, bool):
        raise InvalidArgument("public must be true or false", field="public")
    if "priority" in body:
        parse_function_priority(body["priority"])  # both checked before either changes
    tenancy = request.app[TENANCY_KEY]
    if isinstance(public, bool):
        public = await tenancy.client.set_public(p.tenant, name, public)
        tenancy.remember(p.tenant, name, public)
    else:
        public = await tenancy.is_public(p.tenant, name)
    if "priority" in body:
        fn = await set_function_priority(request, p.tenant, name, body["priority"])
    else:
        fn = await request.app[GATEWAY_KEY].scheduler.get_function(p.tenant, name)
    return web.json_response({"name": fn.name, "tenant": fn.tenant, "public": public,
                              "priority": fn.priority or None})


# ---- wiring --------------------------------------------------------------------------

async def _tenancy(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY_KEY]
    client = TenancyClient(tenancy_pb2_grpc.TenancyStub(gw.scheduler.channel))
    app[TENANCY_KEY] = Tenancy(client)
    loop = asyncio.get_running_loop()
    revocations = loop.create_task(gw.auth.follow_revocations(client.revoked_keys))
    # Budgets' day counts, shared with the other replicas (gateway/budgets.py).
    budget_days = loop.create_task(gw.limiter.budgets.follow(client.add_budget_usage))
    yield
    for task in (revocations, budget_days):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def add_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(_tenancy)
    r = app.router
    r.add_post("/v1/tenants", create_tenant)
    r.add_get("/v1/tenants", list_tenants)
    r.add_put("/v1/tenants/{tenant}/quota", set_quota)
    r.add_put("/v1/tenants/{tenant}/budgets", set_tenant_budgets)
    r.add_post("/v1/keys", create_key)
    r.add_get("/v1/keys", list_keys)
    r.add_delete("/v1/keys/{id}", revoke_key)
    r.add_patch("/v1/functions/{name}", update_function)


_LIMIT = {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string"}],
          "nullable": True}
_BUDGET = {"type": "integer", "minimum": 0, "nullable": True}
_BUDGETS_SCHEMA = {"type": "object", "properties": {name: _BUDGET for name in BUDGETS},
                   "description": "rpm, rpd (requests per minute, per day), tpm, tpd "
                                  "(tokens per minute, per day); null = none."}
_TENANT_SCHEMA = {"type": "object", "required": ["id"], "properties": {
    "id": {"type": "string"}, "created_at": {"type": "number"},
    "budgets": _BUDGETS_SCHEMA,
    "max_memory_bytes": {"type": "integer", "nullable": True},
    "max_instances": {"type": "integer", "nullable": True}}}
_KEY_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["id", "tenant", "scopes"], "properties": {
    "id": {"type": "string"}, "tenant": {"type": "string"}, "name": {"type": "string"},
    "scopes": {"type": "array", "items": {"type": "string", "enum": list(SCOPES)}},
    "created_at": {"type": "number"}, "expires_at": {"type": "number", "nullable": True},
    "revoked_at": {"type": "number", "nullable": True},
    "priority_default": {"type": "integer"}, "priority_max": {"type": "integer"},
    "budgets": _BUDGETS_SCHEMA}}
_TENANT_QUERY = {"name": "tenant", "in": "query", "required": False,
                 "description": "Another tenant (the operator only).",
                 "schema": {"type": "string"}}
FUNCTION_PATCH_SCHEMA: dict[str, Any] = {
    "type": "object", "properties": {
        "public": {"type": "boolean",
                   "description": "Invocable without an API key (rate-limited per "
                                  "client address)."},
        "priority": {"type": "integer", "minimum": PRIORITY_MIN, "maximum": PRIORITY_MAX,
                     "nullable": True,
                     "description": "Default priority of its invocations (null: the "
                                    "calling key's priority_default)."}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/v1/tenants": {
        "post": {"summary": "Create a tenant (operator)",
                 "requestBody": {"required": True, "content": {JSON: {"schema": {
                     "type": "object", "required": ["id"], "properties": {
                         "id": NAME, "max_memory_bytes": _LIMIT,
                         "max_instances": {"type": "integer", "minimum": 0,
                                           "nullable": True}}}}}},
                 "responses": {"201": _json(_TENANT_SCHEMA, "Created."),
                               **_errors(400, 401, 403, 409, 429, 503)}},
        "get": {"summary": "Every tenant with its quota (operator)",
                "responses": {"200": _json({"type": "object", "required": ["tenants"],
                                            "properties": {"tenants": {
                                                "type": "array",
                                                "items": _TENANT_SCHEMA}}}, "Tenants."),
                              **_errors(401, 403, 429, 503)}},
    },
    "/v1/tenants/{tenant}/quota": {"put": {
        "summary": "Set a tenant's quota (operator): null or left out = no limit",
        "parameters": [{"name": "tenant", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {JSON: {"schema": {
            "type": "object", "properties": {
                "max_memory_bytes": _LIMIT,
                "max_instances": {"type": "integer", "minimum": 0, "nullable": True}}}}}},
        "responses": {"200": _json(_TENANT_SCHEMA, "The tenant with its new quota."),
                      **_errors(400, 401, 403, 404, 429, 503)}}},
    "/v1/tenants/{tenant}/budgets": {"put": {
        "summary": "Set a tenant's budgets, shared by its keys (operator)",
        "parameters": [{"name": "tenant", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {JSON: {"schema": _BUDGETS_SCHEMA}}},
        "responses": {"200": _json({"type": "object", "properties": {
            "id": {"type": "string"}, "budgets": _BUDGETS_SCHEMA}}, "The new budgets."),
                      **_errors(400, 401, 403, 404, 429, 503)}}},
    "/v1/keys": {
        "post": {"summary": "Create an API key (tenant admin); the key is in this answer "
                            "only",
                 "requestBody": {"required": False, "content": {JSON: {"schema": {
                     "type": "object", "properties": {
                         "name": {"type": "string"},
                         "scopes": {"type": "array", "items": {"type": "string",
                                                               "enum": list(SCOPES)}},
                         "expires_at": {"type": "number"},
                         "expires_in": {"type": "number"},
                         "tenant": {"type": "string",
                                    "description": "Another tenant (operator only)."},
                         "priority_default": {"type": "integer",
                                              "minimum": PRIORITY_MIN,
                                              "maximum": PRIORITY_MAX},
                         "priority_max": {"type": "integer", "minimum": PRIORITY_MIN,
                                          "maximum": PRIORITY_MAX},
                         **{name: _BUDGET for name in BUDGETS}}}}}},
                 "responses": {"201": _json({**_KEY_SCHEMA, "required": [
                     *_KEY_SCHEMA["required"], "key"], "properties": {
                         **_KEY_SCHEMA["properties"], "key": {"type": "string"}}},
                     "Created: `key` is shown once."),
                     **_errors(400, 401, 403, 404, 429, 503)}},
        "get": {"summary": "The tenant's keys (never the keys themselves)",
                "parameters": [_TENANT_QUERY],
                "responses": {"200": _json({"type": "object", "required": ["keys"],
                                            "properties": {"keys": {
                                                "type": "array", "items": _KEY_SCHEMA}}},
                                           "Keys."),
                              **_errors(400, 401, 403, 429, 503)}},
    },
    "/v1/keys/{id}": {"delete": {
        "summary": "Revoke a key (it stops working within seconds everywhere)",
        "parameters": [{"name": "id", "in": "path", "required": True,
                        "schema": {"type": "string"}}, _TENANT_QUERY],
        "responses": {"200": _json(_KEY_SCHEMA, "Revoked."),
                      **_errors(400, 401, 403, 404, 429, 503)}}},
    "/v1/functions/{name}": {"patch": {
        "summary": "Change a function's settings (deploy scope): public, priority",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": NAME}],
        "requestBody": {"required": True, "content": {JSON: {
            "schema": FUNCTION_PATCH_SCHEMA}}},
        "responses": {"200": _json({"type": "object", "required": ["name", "public"],
                                    "properties": {"name": {"type": "string"},
                                                   "tenant": {"type": "string"},
                                                   "public": {"type": "boolean"},
                                                   "priority": {"type": "integer",
                                                                "nullable": True}}},
                                   "The new settings."),
                      **_errors(400, 401, 403, 404, 429, 503)}}},
}
