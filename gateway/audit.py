"""The audit log: every management action through this gateway, with who (the key's
id, never the key), what, when, from where and the outcome, including refused
attempts (401/403). `GET /v1/audit` reads it back.

One middleware covers every management route, those of other feature modules too:
every request to /v1/* that is not a read (GET/HEAD/OPTIONS), not invocation traffic
(the OpenAI-compatible routes) and not a function URL (/fn/...).

An entry is filed under the tenant acted upon: the key's own, or, when the operator
acts on another tenant (its keys, its quota, its creation), that one, so the tenant's
admins see who changed it; `key_id` and `actor_tenant` say who acted. A tenant's
listing has the entries on it and those of its keys.

Entries go to the scheduler (Tenancy.AppendAudit), which appends them to the DB.
The middleware waits a moment for that, so an answered action is normally on record;
when the scheduler is away they stay queued here, in order, and are sent when it is
back (nothing is dropped short of MAX_PENDING entries waiting).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from tenacity import AsyncRetrying, retry_if_result, wait_exponential

from thaw.core.errors import InvalidArgument, PermissionDenied, ThawError
from thaw.core.grpcutil import call
from thaw.gateway.auth import is_operator, require
from thaw.gateway.caller import client_address, principal_of
from thaw.gateway.errors import status_of
from thaw.gateway.openapi import _errors, _json
from thaw.gateway.state import CONFIG_KEY, GATEWAY_KEY, REQUEST_ID_KEY
from thaw.gateway.tenancy import ACTED_ON_KEY
from thaw.proto import tenancy_pb2, tenancy_pb2_grpc

log = structlog.get_logger()

# An action's answer waits at most this long for its entry to be stored; past it the
# entry stays queued and the answer goes out (the scheduler may be away).
SYNC_WAIT_SECONDS = 2.0
# Sending: a batch at most this large; retries back off up to RETRY_MAX_SECONDS.
BATCH_MAX = 200
RETRY_MIN_SECONDS = 0.2
RETRY_MAX_SECONDS = 10.0
SEND_TIMEOUT = 10.0
# Entries kept while the scheduler is away (~0.5 KB each). Past it the oldest are
# dropped, loudly: the gateway's memory must stay bounded.
MAX_PENDING = 100_000
# On shutdown, the queue gets this long to drain.
CLOSE_GRACE_SECONDS = 5.0
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Invocation traffic (the OpenAI-compatible routes call functions); cancelling an
# invocation or raising its priority is audited (invocation.cancel, .priority).
# Chunk uploads are the transfer under a volume commit or a chunked deploy, which are
# audited (volume.commit, function.deploy): one entry per 8 MiB would flood the log.
NOT_AUDITED_PREFIXES = ("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/blobs/")
# Actions named otherwise than <noun>.<verb by method> (see action_of).
ACTIONS: dict[tuple[str, str], str] = {
    ("POST", "/v1/functions"): "function.deploy",
    ("POST", "/v1/functions/chunked"): "function.deploy",
    ("POST", "/v1/functions/{name}/prewarm"): "snapshot.prewarm",
    ("POST", "/v1/functions/{name}/evict"): "snapshot.evict",
    ("POST", "/v1/keys"): "key.create",
    ("DELETE", "/v1/keys/{id}"): "key.revoke",
}
VERBS = {"POST": "create", "PUT": "set", "PATCH": "update", "DELETE": "delete"}
# Path parameters that name what is acted on, in order of preference.
TARGET_PARAMS = ("name", "id", "node", "tenant", "version", "rule")


def audited(method: str, path: str) -> bool:
    return (method not in READ_METHODS and path.startswith("/v1/")
            and not path.startswith(NOT_AUDITED_PREFIXES))


def action_of(request: web.Request) -> str:
    """`function.deploy`, `node.cordon`, `function.rollback`... from the route: a
    literal last segment after a parameter is the verb (/v1/nodes/{node}/drain ->
    node.drain), else the method is (DELETE /v1/functions/{name} -> function.delete)."""
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else request.path
    named = ACTIONS.get((request.method, canonical))
    if named:
        return named
    segments = [s for s in canonical.split("/")[2:] if s]
    literal = [s for s in segments if not s.startswith("{")]
    if not literal:
        return f"unknown.{VERBS.get(request.method, request.method.lower())}"
    noun = literal[0][:-1] if literal[0].endswith("s") else literal[0]
    if "action" in request.match_info:  # /v1/nodes/{node}/{action:cordon|uncordon}
        return f"{noun}.{request.match_info['action']}"
    last = segments[-1]
    if len(literal) > 1 and not last.startswith("{"):
        return f"{noun}.{last}"
    return f"{noun}.{VERBS.get(request.method, request.method.lower())}"


def outcome_of(status: int) -> str:
    if status < 400:
        return "ok"
    return "denied" if status in (401, 403) else "failed"


def _target(request: web.Request, response_body: bytes | None) -> str:
    for param in TARGET_PARAMS:
        value = request.match_info.get(param)
        if value:
            return value[:400]
    if response_body:  # a creation: the answer names what was made
        try:
            made = json.loads(response_body)
        except ValueError:
            return ""
        if isinstance(made, dict):
            for field in ("id", "name"):
                if isinstance(made.get(field), str):
                    return str(made[field])[:400]
    return ""


class AuditWriter:
    """Sends entries to the scheduler in the order they were recorded; keeps them
    while it cannot, retrying with backoff."""

    def __init__(self, stub: tenancy_pb2_grpc.TenancyStub,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.stub = stub
        self._sleep = sleep
        self._pending: collections.deque[tuple[tenancy_pb2.AuditEntry, asyncio.Future[None]]]
        self._pending = collections.deque()
        self._wake = asyncio.Event()
        self.dropped = 0

    def record(self, entry: tenancy_pb2.AuditEntry) -> asyncio.Future[None]:
        """Queue an entry; the future is done once it is stored."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(self._pending) >= MAX_PENDING:
            _old, old_done = self._pending.popleft()
            self.dropped += 1
            if not old_done.done():
                old_done.cancel()
            log.error("audit queue full: oldest entry dropped", dropped=self.dropped)
        self._pending.append((entry, done))
        self._wake.set()
        return done

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush_once(self) -> bool:
        """Send what is queued (in batches); False if the scheduler refused or is away."""
        while self._pending:
            batch = list(itertools.islice(self._pending, BATCH_MAX))
            try:
                await call(self.stub.AppendAudit(
                    tenancy_pb2.AppendAuditRequest(entries=[e for e, _ in batch]),
                    timeout=SEND_TIMEOUT))
            except ThawError as exc:
                log.warning("audit entries not stored yet; will retry",
                            pending=len(self._pending), error=exc.message)
                return False
            for _ in batch:
                _entry, done = self._pending.popleft()
                if not done.done():
                    done.set_result(None)
        return True

    async def run_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Until what is queued is sent, backing off while the scheduler is away.
            await AsyncRetrying(
                retry=retry_if_result(lambda sent: not sent),
                wait=wait_exponential(multiplier=RETRY_MIN_SECONDS, max=RETRY_MAX_SECONDS),
                sleep=self._sleep)(self.flush_once)


AUDIT_KEY = web.AppKey("audit", AuditWriter)


@web.middleware
async def audit_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    writer = request.app.get(AUDIT_KEY)
    if writer is None or not audited(request.method, request.path) \
            or request.match_info.http_exception is not None:
        return await handler(request)
    tenant, key_id, operator = "", "", False
    with contextlib.suppress(ThawError):  # the handler says why, with its own status
        p = await principal_of(request)
        tenant, key_id = p.tenant, p.key_id
        operator = is_operator(p, request.app[CONFIG_KEY])
    status, body = 500, None
    try:
        response = await handler(request)
        status = response.status
        if isinstance(response, web.Response) and status < 300 and response.body:
            body = response.body if isinstance(response.body, bytes) else None
        return response
    except ThawError as exc:
        status = status_of(exc)
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        detail: dict[str, Any] = {"method": request.method, "path": request.path,
                                  "request_id": request.get(REQUEST_ID_KEY, "")}
        forwarded = request.headers.get("X-Forwarded-For", "")
        if forwarded:
            detail["forwarded_for"] = forwarded[:200]
            detail["peer"] = request.remote or ""
        on_tenant = (request.get(ACTED_ON_KEY) or request.match_info.get("tenant")
                     or request.query.get("tenant") or "")[:64]
        filed_under = tenant
        if on_tenant and on_tenant != tenant:
            # The operator's action on B is B's business too; anyone else's attempt
            # on another tenant stays in its own log (it must not write into B's).
            if operator:
                filed_under = on_tenant
            else:
                detail["on_tenant"] = on_tenant
        entry = tenancy_pb2.AuditEntry(
            time=time.time(), tenant=filed_under, key_id=key_id, actor_tenant=tenant,
            action=action_of(request)[:64],
            target=_target(request, body), source=client_address(
                request, request.app[CONFIG_KEY].trust_forwarded_for)[:200],
            outcome=outcome_of(status), status=status, detail_json=json.dumps(detail))
        stored = writer.record(entry)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(stored), SYNC_WAIT_SECONDS)


# ---- GET /v1/audit -------------------------------------------------------------------

def _number(request: web.Request, key: str, default: float, low: float, high: float
            ) -> float:
    raw = request.query.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise InvalidArgument(f"{key} must be a number", field=key) from exc
    if not low <= value <= high:
        raise InvalidArgument(f"{key} must be in [{low:g}, {high:g}]", field=key)
    return value


def entry_json(e: tenancy_pb2.AuditEntry) -> dict[str, Any]:
    try:
        detail = json.loads(e.detail_json or "{}")
    except ValueError:
        detail = {}
    return {"id": e.id, "time": e.time, "tenant": e.tenant, "key_id": e.key_id,
            "actor_tenant": e.actor_tenant or e.tenant, "action": e.action,
            "target": e.target, "source": e.source, "outcome": e.outcome,
            "status": e.status, "detail": detail}


async def list_audit(request: web.Request) -> web.Response:
    """?from=&to= (unix seconds), ?action= (exact, or a prefix ending in '.'),
    ?limit=, ?before= (an id: the page before it); newest first. A tenant's admin
    sees its tenant's entries (the operator's actions on it included); the operator
    all of them, or ?tenant='s."""
    gw = request.app[GATEWAY_KEY]
    p = await principal_of(request)
    require(p, "admin")
    tenant = request.query.get("tenant", "")
    if is_operator(p, request.app[CONFIG_KEY]):
        pass  # "" = every tenant
    elif tenant and tenant != p.tenant:
        raise PermissionDenied("a tenant's admin sees only its own tenant's audit log",
                               field="tenant")
    else:
        tenant = p.tenant
    action = request.query.get("action", "")
    if len(action) > 64:
        raise InvalidArgument("action is longer than 64 characters", field="action")
    limit = int(_number(request, "limit", 100, 1, 1000))
    before = int(_number(request, "before", 0, 0, 2**62))
    writer = request.app.get(AUDIT_KEY)
    if writer is not None and writer.pending:
        with contextlib.suppress(ThawError):
            await writer.flush_once()  # what this replica recorded is listed too
    reply = await call(tenancy_pb2_grpc.TenancyStub(gw.scheduler.channel).ListAudit(
        tenancy_pb2.ListAuditRequest(
            tenant=tenant, from_time=_number(request, "from", 0, 0, 2**53),
            to_time=_number(request, "to", 0, 0, 2**53), action=action, limit=limit,
            before_id=before), timeout=SEND_TIMEOUT))
    return web.json_response({"entries": [entry_json(e) for e in reply.entries]})


# ---- wiring --------------------------------------------------------------------------

async def _writer(app: web.Application) -> AsyncIterator[None]:
    writer = AuditWriter(tenancy_pb2_grpc.TenancyStub(app[GATEWAY_KEY].scheduler.channel))
    app[AUDIT_KEY] = writer
    task = asyncio.get_running_loop().create_task(writer.run_forever())
    yield
    if writer.pending:
        with contextlib.suppress(TimeoutError, ThawError):
            await asyncio.wait_for(writer.flush_once(), CLOSE_GRACE_SECONDS)
    if writer.pending:
        log.error("audit entries not stored at shutdown", pending=writer.pending)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def add_routes(app: web.Application) -> None:
    # Inside errors_middleware: this one sees the handler's exceptions (and so their
    # statuses) before they become error answers.
    app.middlewares.append(audit_middleware)
    app.cleanup_ctx.append(_writer)
    app.router.add_get("/v1/audit", list_audit)


_ENTRY = {"type": "object", "required": ["id", "time", "action", "outcome"], "properties": {
    "id": {"type": "integer"}, "time": {"type": "number"},
    "tenant": {"type": "string", "description": "The tenant acted upon."},
    "key_id": {"type": "string", "description": "Who: the key's id (never the key)."},
    "actor_tenant": {"type": "string", "description": "The acting key's tenant (the "
                     "operator's, for its actions on another tenant)."},
    "action": {"type": "string"}, "target": {"type": "string"},
    "source": {"type": "string", "description": "The client's address."},
    "outcome": {"type": "string", "enum": ["ok", "denied", "failed"]},
    "status": {"type": "integer"}, "detail": {"type": "object"}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/v1/audit": {"get": {
        "summary": "The audit log, newest first (tenant admin: its tenant; operator: all)",
        "parameters": [
            {"name": "from", "in": "query", "required": False,
             "schema": {"type": "number", "minimum": 0}},
            {"name": "to", "in": "query", "required": False,
             "schema": {"type": "number", "minimum": 0}},
            {"name": "action", "in": "query", "required": False,
             "description": "Exact, or a prefix ending in '.' (function.)",
             "schema": {"type": "string", "maxLength": 64}},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
            {"name": "before", "in": "query", "required": False,
             "description": "Only entries older than this id (paging).",
             "schema": {"type": "integer", "minimum": 0}},
            {"name": "tenant", "in": "query", "required": False,
             "description": "One tenant (the operator only).",
             "schema": {"type": "string"}}],
        "responses": {"200": _json({"type": "object", "required": ["entries"],
                                    "properties": {"entries": {"type": "array",
                                                               "items": _ENTRY}}},
                                   "Entries."),
                      **_errors(400, 401, 403, 429, 503)}}},
}
