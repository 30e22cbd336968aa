"""The HTTP edge (DESIGN.md §9): function URLs, the management API, auth, metrics.

Stateless: every decision that needs state is the scheduler's (Acquire/Release).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from cachetools import TTLCache
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from thaw.core.config import GatewayConfig
from thaw.core.errors import (
    InstanceFailed,
    InvalidBundle,
    NotFound,
    PermissionDenied,
    ThawError,
    Unauthenticated,
)
from thaw.gateway.errors import error_body, error_response
from thaw.gateway.metrics import GatewayMetrics
from thaw.gateway.scheduler_client import SchedulerClient
from thaw.proto import agent_pb2, scheduler_pb2

log = structlog.get_logger()

CONFIG_KEY = web.AppKey("config", GatewayConfig)
SCHEDULER_KEY = web.AppKey("scheduler", SchedulerClient)
HTTP_KEY = web.AppKey("http", aiohttp.ClientSession)
METRICS_KEY = web.AppKey("metrics", GatewayMetrics)
AUTH_CACHE_KEY = web.AppKey("auth_cache", TTLCache)
# A key revoked at the scheduler stops working within this many seconds.
AUTH_CACHE_SECONDS = 10.0
# Longest an invocation waits for placement (queue + cold start) before 504.
ACQUIRE_WAIT_SECONDS = 600.0
STATIC = Path(__file__).parent / "static"
START_NAMES = {agent_pb2.START_UNSPECIFIED: "warm", agent_pb2.START_RESTORE: "restore",
               agent_pb2.START_FRESH: "fresh"}
# Data-plane answers after which the instance is gone (crashed, hung and killed, out of
# memory and exited): the lease is released as failed so it is never reused.
INSTANCE_LOST_STATUSES = (502, 504, 507)
PASSTHROUGH_RESPONSE_HEADERS = ("Content-Type", "X-Thaw-Instance")


# ---- middlewares ---------------------------------------------------------------

@web.middleware
async def errors_middleware(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
    request["request_id"] = request_id
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        response = await handler(request)
    except ThawError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = web.json_response(error_body(exc.reason.lower().replace(" ", "_"),
                                                exc.text or exc.reason), status=exc.status)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    if not response.prepared:
        response.headers["X-Request-ID"] = request_id
    return response


async def principal(request: web.Request) -> scheduler_pb2.Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    digest = hashlib.sha256(key.strip().encode()).hexdigest()
    cache: TTLCache[str, scheduler_pb2.Principal] = request.app[AUTH_CACHE_KEY]
    found = cache.get(digest)
    if found is None:
        found = await request.app[SCHEDULER_KEY].authenticate(digest)
        cache[digest] = found
    return found


def require(p: scheduler_pb2.Principal, scope: str) -> None:
    if scope not in p.scopes and "admin" not in p.scopes:
        raise PermissionDenied(f"this API key lacks the '{scope}' scope")


# ---- management API ------------------------------------------------------------------

def function_url(request: web.Request, tenant: str, name: str) -> str:
    base = request.app[CONFIG_KEY].public_url or f"{request.scheme}://{request.host}"
    return f"{base.rstrip('/')}/fn/{tenant}/{name}"


def function_json(request: web.Request, fn: scheduler_pb2.FunctionInfo) -> dict[str, Any]:
    return {
        "name": fn.name, "tenant": fn.tenant, "version": fn.version, "state": fn.state,
        "reason": fn.reason, "start_mode": fn.start_mode, "handler": fn.handler,
        "bundle_digest": fn.bundle_digest, "snapshot_bytes": fn.snapshot_bytes,
        "warm_instances": fn.warm_instances, "config": json.loads(fn.config_json or "{}"),
        "created_at": fn.created_at, "updated_at": fn.updated_at,
        "url": function_url(request, fn.tenant, fn.name),
    }


async def read_bundle_upload(request: web.Request) -> bytes:
    limit = request.app[CONFIG_KEY].max_bundle_bytes
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if isinstance(part, aiohttp.BodyPartReader) and part.name == "bundle":
                data = bytearray()
                while chunk := await part.read_chunk():
                    data.extend(chunk)
                    if len(data) > limit:
                        raise InvalidBundle(f"the bundle is larger than {limit} bytes",
                                            field="bundle")
                return bytes(data)
        raise InvalidBundle("multipart upload has no 'bundle' part", field="bundle")
    data = await request.read()
    if not data:
        raise InvalidBundle("send the bundle tarball as the request body", field="bundle")
    return data


async def create_function(request: web.Request) -> web.Response:
    p = await principal(request)
    require(p, "deploy")
    bundle = await read_bundle_upload(request)
    wait = request.query.get("wait", "false").lower() in ("1", "true", "yes")
    metrics = request.app[METRICS_KEY]
    try:
        fn = await request.app[SCHEDULER_KEY].create_function(p.tenant, bundle, wait)
    except ThawError:
        metrics.deploys.labels("rejected").inc()
        raise
    metrics.deploys.labels(fn.state).inc()
    body = function_json(request, fn)
    return web.json_response(body, status=201, headers={"Location": f"/v1/functions/{fn.name}"})


async def list_functions(request: web.Request) -> web.Response:
    p = await principal(request)
    fns = await request.app[SCHEDULER_KEY].list_functions(p.tenant)
    return web.json_response({"functions": [function_json(request, f) for f in fns]})


async def get_function(request: web.Request) -> web.Response:
    p = await principal(request)
    fn = await request.app[SCHEDULER_KEY].get_function(p.tenant, request.match_info["name"])
    return web.json_response(function_json(request, fn))


async def delete_function(request: web.Request) -> web.Response:
    p = await principal(request)
    require(p, "deploy")
    await request.app[SCHEDULER_KEY].delete_function(p.tenant, request.match_info["name"])
    return web.Response(status=204)


async def prewarm_function(request: web.Request) -> web.Response:
    p = await principal(request)
    require(p, "deploy")
    reply = await request.app[SCHEDULER_KEY].prewarm(
        p.tenant, request.match_info["name"], request.query.get("node", ""))
    return web.json_response({"nodes": list(reply.node_ids), "bytes": reply.bytes,
                              "seconds": reply.seconds})


async def evict_function(request: web.Request) -> web.Response:
    p = await principal(request)
    require(p, "deploy")
    reply = await request.app[SCHEDULER_KEY].evict(
        p.tenant, request.match_info["name"], request.query.get("node", ""))
    return web.json_response({"nodes": list(reply.node_ids), "bytes": reply.bytes})


def node_json(node: scheduler_pb2.NodeInfo) -> dict[str, Any]:
    return {
        "id": node.id, "state": node.state, "instances": node.instances,
        "data_url": node.data_url, "disk_bytes": node.disk_bytes,
        "last_heartbeat_age_seconds": round(node.last_heartbeat_age_seconds, 3),
        "devices": [{"id": d.id, "kind": d.kind, "capacity_bytes": d.capacity_bytes,
                     "used_bytes": d.used_bytes} for d in node.devices],
        "pinned": {"capacity_bytes": node.pinned.capacity_bytes,
                   "used_bytes": node.pinned.used_bytes, "chunks": node.pinned.chunks,
                   "snapshots": len(node.pinned.snapshot_keys)},
    }


async def list_nodes(request: web.Request) -> web.Response:
    require(await principal(request), "admin")
    nodes = await request.app[SCHEDULER_KEY].list_nodes()
    return web.json_response({"nodes": [node_json(n) for n in nodes]})


async def cordon_node(request: web.Request) -> web.Response:
    require(await principal(request), "admin")
    cordoned = request.match_info["action"] == "cordon"
    node = await request.app[SCHEDULER_KEY].cordon(request.match_info["node"], cordoned)
    return web.json_response(node_json(node))


# ---- invocation ------------------------------------------------------------------------

def server_timing(stages: list[tuple[str, float]], upstream: str | None) -> str:
    parts = [f"{name};dur={seconds * 1000:.2f}" for name, seconds in stages]
    if upstream:
        parts.append(upstream)
    return ", ".join(parts)


async def invoke(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    tenant, name = request.match_info["tenant"], request.match_info["name"]
    p = await principal(request)
    require(p, "invoke")
    if p.tenant != tenant:
        # Not 403: another tenant's function names are not disclosed.
        raise NotFound(f"function {tenant}/{name} not found", field="name")
    config = request.app[CONFIG_KEY]
    if request.content_length is not None and request.content_length > config.max_body_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=config.max_body_bytes,
                                            actual_size=request.content_length)
    body = await request.read()
    scheduler = request.app[SCHEDULER_KEY]
    metrics = request.app[METRICS_KEY]
    lease = await scheduler.acquire(tenant, name, ACQUIRE_WAIT_SECONDS)
    start = START_NAMES.get(lease.start, "warm")
    if start != "warm":
        metrics.cold_starts.labels(start).inc()
    stages = [(t.stage, t.seconds) for t in lease.timings]
    placed = time.perf_counter()
    failed, reason = False, ""
    status = 500
    try:
        tail = request.match_info.get("tail", "")
        url = f"{lease.data_url}/v1/instances/{lease.instance_id}/invoke" + (
            f"/{tail}" if tail else "")
        headers = {h: request.headers[h] for h in ("Content-Type", "Accept")
                   if h in request.headers}
        headers["X-Request-ID"] = request["request_id"]
        try:
            async with request.app[HTTP_KEY].post(url, data=body, headers=headers) as upstream:
                status = upstream.status
                if status in INSTANCE_LOST_STATUSES:
                    failed, reason = True, f"instance failed while serving ({status})"
                out = web.StreamResponse(status=status)
                for h in PASSTHROUGH_RESPONSE_HEADERS:
                    if h in upstream.headers:
                        out.headers[h] = upstream.headers[h]
                out.headers["X-Thaw-Start"] = start
                out.headers["X-Thaw-Node"] = lease.node_id
                out.headers["X-Request-ID"] = request["request_id"]
                upstream_timing = upstream.headers.get("Server-Timing")
                if upstream.content_length is not None:
                    payload = await upstream.read()
                    stages_all = [*stages, ("total", time.perf_counter() - started)]
                    out.headers["Server-Timing"] = server_timing(stages_all, upstream_timing)
                    out.content_length = len(payload)
                    await out.prepare(request)
                    await out.write(payload)
                else:
                    out.headers["Server-Timing"] = server_timing(stages, upstream_timing)
                    await out.prepare(request)
                    async for chunk in upstream.content.iter_any():
                        await out.write(chunk)
                await out.write_eof()
        except (aiohttp.ClientError, ConnectionError) as exc:
            failed, reason = True, f"node {lease.node_id} unreachable: {exc}"
            raise InstanceFailed(f"the instance's node could not be reached: {exc}") from exc
        return out
    finally:
        run = time.perf_counter() - placed
        metrics.stage_seconds.labels("run").observe(run)
        for stage, seconds in stages:
            metrics.stage_seconds.labels(stage).observe(seconds)
        metrics.invocations.labels(f"{tenant}/{name}", start, str(status)).inc()
        try:
            await scheduler.release(lease.lease_id, failed, reason)
        except ThawError as exc:
            log.warning("release failed", lease=lease.lease_id, error=str(exc))


# ---- health, metrics, dashboard ---------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if await request.app[SCHEDULER_KEY].ready():
        return web.json_response({"status": "ready"})
    return web.json_response(error_body("unavailable", "scheduler is not reachable"),
                             status=503)


async def metrics_view(request: web.Request) -> web.Response:
    data = generate_latest(request.app[METRICS_KEY].registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def _clients(app: web.Application):  # type: ignore[no-untyped-def]
    app[SCHEDULER_KEY] = SchedulerClient(app[CONFIG_KEY].scheduler_address)
    app[HTTP_KEY] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
        timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
    yield
    await app[HTTP_KEY].close()
    await app[SCHEDULER_KEY].close()


def make_app(config: GatewayConfig, metrics: GatewayMetrics | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_middleware],
                          client_max_size=max(config.max_body_bytes, config.max_bundle_bytes))
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = metrics or GatewayMetrics()
    app[AUTH_CACHE_KEY] = TTLCache(maxsize=10_000, ttl=AUTH_CACHE_SECONDS)
    app.cleanup_ctx.append(_clients)
    r = app.router
    r.add_get("/", index)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_view)
    r.add_post("/v1/functions", create_function)
    r.add_get("/v1/functions", list_functions)
    r.add_get("/v1/functions/{name}", get_function)
    r.add_delete("/v1/functions/{name}", delete_function)
    r.add_post("/v1/functions/{name}/prewarm", prewarm_function)
    r.add_post("/v1/functions/{name}/evict", evict_function)
    r.add_get("/v1/nodes", list_nodes)
    r.add_post("/v1/nodes/{node}/{action:cordon|uncordon}", cordon_node)
    r.add_post("/fn/{tenant}/{name}", invoke)
    r.add_post("/fn/{tenant}/{name}/{tail:.*}", invoke)
    return app
