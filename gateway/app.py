"""The HTTP edge (DESIGN.md §9): function URLs, the OpenAI-compatible routes, the
management API, auth, metrics, the OpenAPI document.

Stateless as far as the platform goes: placement is the scheduler's (Acquire/Release).
What it holds in memory (rate buckets, queue depths, circuit breakers, leases kept a
moment for the next call) is per replica; see gateway/config.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from thaw.core.config import GatewayConfig
from thaw.core.errors import BundleTooLarge, InvalidArgument, InvalidBundle, ThawError
from thaw.core.pki import GATEWAY, internal_identity
from thaw.core.tracing import TRACEPARENT
from thaw.core.units import format_size
from thaw.gateway import cors, openai_api, routes, tracing
from thaw.gateway.admission import FunctionQueues
from thaw.gateway.auth import Authenticator, require, require_operator
from thaw.gateway.breaker import Breakers, BreakerState
from thaw.gateway.caller import principal_of
from thaw.gateway.config import GatewaySettings
from thaw.gateway.dispatch import Dispatcher
from thaw.gateway.errors import PayloadTooLarge, error_body, error_response
from thaw.gateway.invoke import invoke
from thaw.gateway.jsonbody import JSON_ROUTES_KEY, json_limits_middleware, json_routes
from thaw.gateway.leases import LeasePool
from thaw.gateway.login_guard import FailedLogins
from thaw.gateway.metrics import GatewayMetrics
from thaw.gateway.nodeclient import node_client
from thaw.gateway.origins import (
    FUNCTION_ORIGIN_KEY,
    FunctionOrigin,
    function_origin_middleware,
    on_response_prepare,
)
from thaw.gateway.priority import remember_function
from thaw.gateway.ratelimit import KeyRateLimiter
from thaw.gateway.request import BODY_DEADLINE_KEY, BODY_TIMEOUT_KEY, BodyClock, read_body
from thaw.gateway.scheduler_client import SchedulerClient
from thaw.gateway.snapshots import snapshot_pass
from thaw.gateway.state import (
    CONFIG_KEY,
    ERROR_CODE_KEY,
    FUNCTION_KEY,
    GATEWAY_KEY,
    METRICS_KEY,
    RECEIVED_KEY,
    REQUEST_ID_KEY,
    START_KEY,
    TENANT_ERROR_KEY,
    Gateway,
)
from thaw.gateway.stats import STATS_KEY
from thaw.gateway.views import function_json, node_json
from thaw.proto import scheduler_pb2

log = structlog.get_logger()

# Longest an invocation waits for placement (queue + cold start) before 504.
ACQUIRE_WAIT_SECONDS = 600.0
# A node's data plane that does not accept a connection within this is unreachable.
CONNECT_TIMEOUT_SECONDS = 5.0
# How long shutdown waits for background work (lease releases, answers still being
# read after a client's deadline) before cancelling it.
CLOSE_GRACE_SECONDS = 5.0
STATIC = Path(__file__).parent / "static"
SCHEDULER_OVERRIDE_KEY = web.AppKey("scheduler_override", SchedulerClient)
# A client's X-Request-ID is kept only if it is this tame (it goes into every log line).
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# ---- middlewares ---------------------------------------------------------------

def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if REQUEST_ID_PATTERN.match(given) else os.urandom(16).hex()


@web.middleware
async def errors_middleware(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    started = time.perf_counter()
    request[RECEIVED_KEY] = asyncio.get_running_loop().time()
    request_id = request[REQUEST_ID_KEY] = _request_id(request)
    structlog.contextvars.bind_contextvars(request_id=request_id)
    code = ""
    try:
        try:
            response = await handler(request)
        except ThawError as exc:
            code = exc.code
            response = error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = exc.reason.lower().replace(" ", "_")
            response = web.json_response(error_body(code, exc.text or exc.reason),
                                         status=exc.status)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            # A bug: the client still gets the error format, the log the traceback.
            log.exception("unhandled error", method=request.method, path=request.path)
            code = "internal"
            response = web.json_response(
                error_body(code, f"internal error: {type(exc).__name__}"), status=500)
        if not response.prepared:
            response.headers["X-Request-ID"] = request_id
            if TRACEPARENT not in response.headers:  # the fast lane's errors too
                traceparent = tracing.answer_traceparent(request)
                if traceparent is not None:
                    response.headers[TRACEPARENT] = traceparent
        _observe(request, response.status, code or request.get(ERROR_CODE_KEY, ""), started,
                 response.headers.get("Server-Timing", ""))
        return response
    finally:
        structlog.contextvars.unbind_contextvars("request_id")


def _observe(request: web.Request, status: int, code: str, started: float,
             server_timing: str = "") -> None:
    metrics = request.app[METRICS_KEY]
    function = request.get(FUNCTION_KEY)
    if function is not None:
        start = request.get(START_KEY, "none")
        metrics.count_invocation(function, start, status)
        metrics.observe_stage("total", time.perf_counter() - started)
        stats = request.app.get(STATS_KEY)
        if stats is not None:  # the dashboard's live figures (gateway/stats.py)
            stats.record(function, request[REQUEST_ID_KEY], status, start, server_timing,
                         (time.perf_counter() - started) * 1000,
                         tenant_error=request.get(TENANT_ERROR_KEY, False))
    if code:
        metrics.errors.labels(code).inc()
    elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
    if status >= 500:
        log.warning("request", method=request.method, path=request.path, status=status,
                    code=code, ms=elapsed_ms)
    elif status >= 400 or code:
        log.info("request", method=request.method, path=request.path, status=status,
                 code=code, ms=elapsed_ms)
    else:
        log.debug("request", method=request.method, path=request.path, status=status,
                  ms=elapsed_ms)


async def principal(request: web.Request) -> scheduler_pb2.Principal:
    return await principal_of(request)


# ---- management API ------------------------------------------------------------------

async def read_bundle_upload(request: web.Request) -> bytes:
    limit = request.app[CONFIG_KEY].max_bundle_bytes
    if request.content_type.startswith("multipart/"):
        try:
            return await _bundle_part(request, limit)
        except (HttpProcessingError, ValueError, AssertionError) as exc:
            # aiohttp's multipart reader raises these on a malformed body.
            raise InvalidBundle(f"malformed multipart body: {exc}", field="bundle") from exc
    if request.content_length is not None and request.content_length > limit:
        raise _bundle_too_large(limit)
    try:  # read_body: within body_timeout_seconds and body_deadline_seconds
        body = await read_body(request, limit)
    except PayloadTooLarge:
        raise _bundle_too_large(limit) from None
    if not body:
        raise InvalidBundle("send the bundle tarball as the request body", field="bundle")
    if len(body) > limit:
        raise _bundle_too_large(limit)
    return body


def _bundle_too_large(limit: int) -> BundleTooLarge:
    return BundleTooLarge(f"the bundle is larger than {format_size(limit)} packed (the "
                          "gateway's max_bundle_bytes)", field="bundle")


async def _bundle_part(request: web.Request, limit: int) -> bytes:
    reader = await request.multipart()
    async for part in reader:
        if isinstance(part, aiohttp.BodyPartReader) and part.name == "bundle":
            data = bytearray()
            clock = BodyClock(request.app)
            while True:
                chunk = await clock.next(part.read_chunk, "the bundle")
                if not chunk:
                    break
                data.extend(chunk)
                if len(data) > limit:
                    raise _bundle_too_large(limit)
            return bytes(data)
    raise InvalidBundle("multipart upload has no 'bundle' part", field="bundle")


async def create_function(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    p = await principal(request)
    require(p, "deploy")
    bundle = await read_bundle_upload(request)
    wait = request.query.get("wait", "false").lower() in ("1", "true", "yes")
    force = request.query.get("force", "false").lower() in ("1", "true", "yes")
    try:
        fn = await gw.scheduler.create_function(p.tenant, bundle, wait, force)
    except ThawError:
        gw.metrics.deploys.labels("rejected").inc()
        raise
    gw.metrics.deploys.labels("unchanged" if fn.unchanged else fn.state).inc()
    remember_function(request.app, fn)
    body = function_json(request, fn)
    body["unchanged"] = fn.unchanged
    if fn.unchanged:
        # The bundle it serves already: that version is kept, nothing was created.
        return web.json_response(body, status=200)
    gw.leases.forget_function(f"{fn.tenant}/{fn.name}")
    return web.json_response(body, status=201, headers={"Location": f"/v1/functions/{fn.name}"})


async def list_functions(request: web.Request) -> web.Response:
    p = await principal(request)
    fns = await request.app[GATEWAY_KEY].scheduler.list_functions(p.tenant)
    return web.json_response({"functions": [function_json(request, f) for f in fns]})


async def get_function(request: web.Request) -> web.Response:
    p = await principal(request)
    fn = await request.app[GATEWAY_KEY].scheduler.get_function(
        p.tenant, request.match_info["name"])
    return web.json_response(function_json(request, fn))


async def delete_function(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    p = await principal(request)
    require(p, "deploy")
    name = request.match_info["name"]
    gw.leases.forget_function(f"{p.tenant}/{name}")
    await gw.scheduler.delete_function(p.tenant, name)
    return web.Response(status=204)


async def prewarm_function(request: web.Request) -> web.StreamResponse:
    if "application/x-ndjson" in request.headers.get("Accept", ""):
        return await snapshot_pass(request, "prewarm")
    p = await principal(request)
    require(p, "deploy")
    reply = await request.app[GATEWAY_KEY].scheduler.prewarm(
        p.tenant, request.match_info["name"], request.query.get("node", ""))
    return web.json_response({"nodes": list(reply.node_ids), "bytes": reply.bytes,
                              "seconds": reply.seconds})


async def evict_function(request: web.Request) -> web.Response:
    p = await principal(request)
    require(p, "deploy")
    reply = await request.app[GATEWAY_KEY].scheduler.evict(
        p.tenant, request.match_info["name"], request.query.get("node", ""))
    return web.json_response({"nodes": list(reply.node_ids), "bytes": reply.bytes})


async def list_nodes(request: web.Request) -> web.Response:
    require_operator(await principal(request), request.app[CONFIG_KEY])
    nodes = await request.app[GATEWAY_KEY].scheduler.list_nodes()
    return web.json_response({"nodes": [node_json(n) for n in nodes]})


async def cordon_node(request: web.Request) -> web.Response:
    require_operator(await principal(request), request.app[CONFIG_KEY])
    cordoned = request.match_info["action"] == "cordon"
    node = await request.app[GATEWAY_KEY].scheduler.cordon(request.match_info["node"],
                                                           cordoned)
    return web.json_response(node_json(node))


# ---- health, metrics, dashboard ---------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if await request.app[GATEWAY_KEY].scheduler.ready():
        return web.json_response({"status": "ready"})
    return web.json_response(error_body("unavailable", "scheduler is not reachable"),
                             status=503)


async def list_events(request: web.Request) -> web.Response:
    """The scheduler's event log (pressure changes, nodes lost, evictions...):
    ?after=<seq>&limit=<n>&kind=<kind> (repeatable)."""
    require_operator(await principal(request), request.app[CONFIG_KEY])
    numbers = {}
    for key, default, top in (("after", "0", 2**63 - 1), ("limit", "100", 10_000)):
        try:
            numbers[key] = int(request.query.get(key, default))
        except ValueError as exc:
            raise InvalidArgument(f"{key} must be an integer", field=key) from exc
        if not 0 <= numbers[key] <= top:
            raise InvalidArgument(f"{key} must be in [0, {top}]", field=key)
    after, limit = numbers["after"], numbers["limit"]
    reply = await request.app[GATEWAY_KEY].scheduler.list_events(
        after, limit, request.query.getall("kind", []))
    return web.json_response({"last_seq": reply.last_seq, "events": [
        {"seq": e.seq, "time": e.time, "kind": e.kind, "message": e.message,
         "node_id": e.node_id, "function": e.function, "attrs": dict(e.attrs)}
        for e in reply.events]})


# Memory-pressure levels as numbers for Prometheus (scheduler/pressure.py PressureLevel).
PRESSURE_LEVELS = {"normal": 0, "pressure": 1, "critical": 2, "emergency": 3}


async def metrics_view(request: web.Request) -> web.Response:
    """The platform's figures (per function, per node): the operator's only, like
    /v1/nodes. Prometheus sends the key as `authorization: credentials_file`."""
    require_operator(await principal(request), request.app[CONFIG_KEY])
    metrics = request.app[METRICS_KEY]
    try:
        nodes = await request.app[GATEWAY_KEY].scheduler.list_nodes()
    except ThawError:
        nodes = None  # the scheduler is away: keep the last cluster figures
    if nodes is not None:
        metrics.pressure_level.clear()
        metrics.pinned_used.clear()
        for node in nodes:
            for p in node.pressures:
                metrics.pressure_level.labels(node.id, p.resource).set(
                    PRESSURE_LEVELS.get(p.level, 0))
            metrics.pinned_used.labels(node.id).set(node.pinned.used_bytes)
    data = generate_latest(metrics.registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


# ---- lifecycle ---------------------------------------------------------------------------

async def _components(app: web.Application) -> AsyncIterator[None]:
    config, metrics = app[CONFIG_KEY], app[METRICS_KEY]
    override = app.get(SCHEDULER_OVERRIDE_KEY)
    # A stand-in scheduler (tests) hands out its own nodes' URLs, plaintext.
    tls = internal_identity(config, GATEWAY) if override is None else None
    scheduler = override or SchedulerClient(config.scheduler_address, tls)
    nodes = node_client(tls, CONNECT_TIMEOUT_SECONDS)

    def breaker_changed(kind: str, name: str, state: BreakerState) -> None:
        metrics.set_breaker_state(kind, name, state.value)
        log.warning("circuit " + state.value.replace("_", "-"), kind=kind, name=name)

    leases = LeasePool(scheduler, config.lease_linger, config.lease_max_age,
                       aging_rate=config.priority_aging_rate)
    dispatcher = Dispatcher(
        leases, nodes, FunctionQueues(config.queue_high_water, config.queue_low_water,
                                     metrics.set_queue_depth),
        Breakers("function", config.breaker_failures, config.breaker_cooldown,
                 on_change=breaker_changed),
        Breakers("node", config.breaker_failures, config.breaker_cooldown,
                 on_change=breaker_changed),
        metrics, ACQUIRE_WAIT_SECONDS)
    app[GATEWAY_KEY] = Gateway(
        config=config, metrics=metrics, scheduler=scheduler, nodes=nodes,
        auth=Authenticator(scheduler, FailedLogins(config.auth_failure_limit,
                                                   config.auth_failure_window)),
        limiter=KeyRateLimiter(config.rate_limit_rpm, config.rate_limit_burst),
        leases=leases, dispatcher=dispatcher)
    reaper = asyncio.get_running_loop().create_task(leases.reap_forever())
    yield
    reaper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reaper
    await leases.close(CLOSE_GRACE_SECONDS)
    await nodes.close()
    await scheduler.close()


def make_app(config: GatewayConfig, metrics: GatewayMetrics | None = None,
             scheduler: SchedulerClient | None = None) -> web.Application:
    """`scheduler`: a stand-in for tests; by default a client of config's address."""
    settings = GatewaySettings.of(config)
    # json_limits_middleware last: a JSON route's body is checked just before its
    # handler, once the origin serves the route.
    app = web.Application(
        middlewares=[errors_middleware, function_origin_middleware, json_limits_middleware],
        client_max_size=max(settings.max_body_bytes, settings.max_bundle_bytes))
    app.on_response_prepare.append(on_response_prepare)
    app.on_response_prepare.append(tracing.on_response_prepare)
    tracing.configure(settings.tracing, settings.traces_kept)
    cors.install(app)
    app[FUNCTION_ORIGIN_KEY] = FunctionOrigin()
    app[CONFIG_KEY] = settings
    app[BODY_TIMEOUT_KEY] = settings.body_timeout_seconds
    app[BODY_DEADLINE_KEY] = settings.body_deadline_seconds
    app[JSON_ROUTES_KEY] = json_routes(routes.build_document())
    app[METRICS_KEY] = metrics or GatewayMetrics()
    if scheduler is not None:
        app[SCHEDULER_OVERRIDE_KEY] = scheduler
    app.cleanup_ctx.append(_components)
    r = app.router
    r.add_get("/", index)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_view)
    r.add_get("/openapi.json", routes.openapi_view)
    r.add_post("/v1/functions", create_function)
    r.add_get("/v1/functions", list_functions)
    r.add_get("/v1/functions/{name}", get_function)
    r.add_delete("/v1/functions/{name}", delete_function)
    r.add_post("/v1/functions/{name}/prewarm", prewarm_function)
    r.add_post("/v1/functions/{name}/evict", evict_function)
    r.add_get("/v1/nodes", list_nodes)
    r.add_get("/v1/events", list_events)
    r.add_post("/v1/nodes/{node}/{action:cordon|uncordon}", cordon_node)
    openai_api.add_routes(app)
    routes.add_routes(app)
    r.add_post("/fn/{tenant}/{name}", invoke)
    r.add_post("/fn/{tenant}/{name}/{path:.*}", invoke)
    return app
