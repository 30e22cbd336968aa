"""The dashboard's server side: its static files and the live feed it runs on.

`GET /` (app.py) is the page; `GET /static/{file}` its script, style and the vendored
charting library (uPlot, MIT; gateway/static/vendor/). No build step, nothing fetched
from elsewhere.

`GET /v1/live` is a WebSocket. The client's first message authenticates it:
`{"key": "thaw_..."}` (a key never goes in a URL, where logs and proxies keep it). A bad
key gets an `{"type": "error", "error": {...}}` frame and the socket is closed with
code 4401. The client may then say which function its charts show,
`{"select": "<name>"}` (default: the first). About once a second the server pushes a
`{"type": "snapshot"}`: the tenant's functions (the scheduler's view: state, version,
snapshot size and tiers, warm instances, URL) with this replica's live figures
(gateway/stats.py; series and cold-start stages for the selected function only), the
latest invocations, and for platform operators the nodes (devices with their slices,
pinned tier, pressure) and recent events and alerts.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from thaw.core.errors import InvalidArgument, NotFound, ThawError
from thaw.gateway import jsonbody
from thaw.gateway.auth import is_operator
from thaw.gateway.caller import client_address, reads_all_invocations
from thaw.gateway.errors import error_body
from thaw.gateway.inputs import read_schema
from thaw.gateway.openapi import PUBLIC, _json, _ref
from thaw.gateway.state import CONFIG_KEY, GATEWAY_KEY
from thaw.gateway.stats import STATS_KEY, FunctionStats
from thaw.gateway.views import function_json, node_json
from thaw.proto import scheduler_pb2

log = structlog.get_logger()

STATIC = Path(__file__).parent / "static"
# The files /static/{file} serves: the page's own and the vendored library's.
STATIC_FILES: dict[str, tuple[Path, str]] = {
    "dashboard.js": (STATIC / "dashboard.js", "text/javascript"),
    "inputs_form.js": (STATIC / "inputs_form.js", "text/javascript"),
    "dashboard.css": (STATIC / "dashboard.css", "text/css"),
    "uPlot.iife.min.js": (STATIC / "vendor" / "uPlot.iife.min.js", "text/javascript"),
    "uPlot.min.css": (STATIC / "vendor" / "uPlot.min.css", "text/css"),
}
# The vendored library never changes under a name; the page's files may with a deploy,
# so the browser revalidates them (ETag / Last-Modified: a 304 costs no body).
VENDOR_CACHE = "public, max-age=86400"
OWN_CACHE = "no-cache"
# How often a snapshot is pushed ("about once a second").
PUSH_SECONDS = 1.0
# A client that has not sent its key by then is closed.
AUTH_WAIT_SECONDS = 10.0
# WebSocket close codes (4000-4999 are the application's): sync with dashboard.js.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_AUTH_TIMEOUT = 4408
RECENT_SHOWN = 50
# Function names are at most this long (core/spec.py's name pattern).
MAX_NAME_LENGTH = 63
EVENTS_SHOWN = 30
# A snapshot is JSON of modest size; anything the client sends is only its key.
MAX_CLIENT_MESSAGE_BYTES = 4096
HEARTBEAT_SECONDS = 20.0
# Open feeds, closed at shutdown so a stopping gateway does not wait on dashboards.
LIVE_SOCKETS_KEY: web.AppKey[weakref.WeakSet[Any]] = web.AppKey("live_sockets")


async def static_file(request: web.Request) -> web.StreamResponse:
    entry = STATIC_FILES.get(request.match_info["file"])
    if entry is None:
        raise NotFound(f"no static file {request.match_info['file']!r}", field="file")
    path, content_type = entry
    response = web.FileResponse(path, headers={
        "Content-Type": content_type,
        "Cache-Control": VENDOR_CACHE if "vendor" in path.parts else OWN_CACHE})
    return response


# ---- the snapshot ------------------------------------------------------------------------

def _tenant_functions(stats: FunctionStats, tenant: str) -> list[str]:
    prefix = f"{tenant}/"
    return [f for f in stats.functions() if f.startswith(prefix)]


def slices_json(node: scheduler_pb2.NodeInfo) -> list[dict[str, Any]]:
    return [{"device_id": s.device_id, "instance_id": s.instance_id,
             "function": s.function, "size_bytes": s.size_bytes}
            for s in node.telemetry.slices]


def _optional_module(name: str) -> Any:
    """A feature module another part of the gateway may provide (alerts, usage, logs)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


ALERTS_SHOWN = 20


def _alerts(app: web.Application) -> dict[str, Any] | None:
    """Active alerts and the latest transitions from gateway/alerts/engine.py, when
    that module is part of this gateway and its engine runs."""
    alerts = _optional_module("thaw.gateway.alerts")
    key = getattr(alerts, "ALERTING_KEY", None)
    alerting = app.get(key) if key is not None else None
    engine = getattr(alerting, "engine", None)
    if engine is None:
        return None
    doc = engine.to_json()
    return {"active": doc.get("active", []), "recent": doc.get("recent", [])[:ALERTS_SHOWN]}


async def build_snapshot(request: web.Request, p: scheduler_pb2.Principal,
                         operator: bool, selected: str = "") -> dict[str, Any]:
    """`selected`: the function whose charts the page shows (its series are sent; the
    others' figures only). Empty: the first function."""
    gw = request.app[GATEWAY_KEY]
    stats = request.app[STATS_KEY]
    functions = await gw.scheduler.list_functions(p.tenant)
    if functions and selected not in {fn.name for fn in functions}:
        selected = functions[0].name
    out_functions = []
    for fn in functions:
        body = function_json(request, fn)
        body["stats"] = stats.function_summary(f"{fn.tenant}/{fn.name}",
                                               charts=fn.name == selected)
        body["snapshot_tiers"] = snapshot_tiers(fn)
        # The selected function's typed inputs (docs/function-api.md), for its form.
        body["inputs"] = read_schema(fn.input_schema) if fn.name == selected else None
        out_functions.append(body)
    snapshot: dict[str, Any] = {
        "type": "snapshot", "time": round(time.time(), 3), "tenant": p.tenant,
        "operator": operator, "functions": out_functions,
        # Calls of every key of the tenant: not an invoke-only key's to see.
        "recent": [i.to_json() for i in stats.recent(_tenant_functions(stats, p.tenant),
                                                      RECENT_SHOWN)]
        if reads_all_invocations(p) else [],
    }
    if operator:
        nodes = await gw.scheduler.list_nodes()
        snapshot["nodes"] = [{**node_json(n), "slices": slices_json(n)} for n in nodes]
        # Only last_seq: no event is past the largest sequence number.
        events = await gw.scheduler.list_events(2**63 - 1, 1)
        after = max(0, events.last_seq - EVENTS_SHOWN)
        recent_events = await gw.scheduler.list_events(after, EVENTS_SHOWN)
        snapshot["events"] = feed_events(recent_events.events)
        alerts = _alerts(request.app)
        if alerts is not None:
            snapshot["alerts"] = alerts
    return snapshot


def feed_events(events: Iterable[scheduler_pb2.Event]) -> list[dict[str, Any]]:
    """The events feed, newest first. The platform's own bookkeeping (actor "system":
    scheduler/events.py Actor) is no change an operator made and is left out; GET
    /v1/events keeps it."""
    return [{"seq": e.seq, "time": e.time, "kind": e.kind, "message": e.message,
             "node_id": e.node_id, "function": e.function,
             "actor": e.attrs.get("actor", "")}
            for e in reversed(list(events)) if e.attrs.get("actor") != "system"]


def snapshot_tiers(fn: scheduler_pb2.FunctionInfo) -> dict[str, list[str]]:
    """Nodes holding the function's active snapshot, per tier."""
    return {"disk": list(fn.snapshot_disk_nodes), "pinned": list(fn.snapshot_pinned_nodes)}


# ---- the WebSocket -------------------------------------------------------------------------

async def _authenticate(request: web.Request, ws: web.WebSocketResponse
                        ) -> scheduler_pb2.Principal | None:
    """The first message names the key; None (and the socket closed) if it does not."""
    try:
        msg = await ws.receive(timeout=AUTH_WAIT_SECONDS)
    except TimeoutError:
        await _refuse(ws, CLOSE_AUTH_TIMEOUT, "unauthenticated",
                      f"send {{\"key\": \"<API key>\"}} within {AUTH_WAIT_SECONDS:g}s")
        return None
    if msg.type != WSMsgType.TEXT:
        await _refuse(ws, CLOSE_UNAUTHENTICATED, "unauthenticated",
                      "the first message must be JSON text {\"key\": \"<API key>\"}")
        return None
    try:
        hello = jsonbody.loads(msg.data)
        key = hello["key"] if isinstance(hello, dict) else None
    except (ValueError, KeyError):
        key = None
    if not isinstance(key, str) or not key:
        await _refuse(ws, CLOSE_UNAUTHENTICATED, "unauthenticated",
                      "the first message must be {\"key\": \"<API key>\"}")
        return None
    try:
        gw = request.app[GATEWAY_KEY]
        return await gw.auth.principal(
            f"Bearer {key}", client_address(request, gw.config.trust_forwarded_for))
    except ThawError as exc:
        await _refuse(ws, CLOSE_UNAUTHENTICATED, exc.code, exc.message)
        return None


async def _refuse(ws: web.WebSocketResponse, close_code: int, code: str,
                  message: str) -> None:
    with contextlib.suppress(ConnectionError):
        await ws.send_json({"type": "error", **error_body(code, message)})
    await ws.close(code=close_code, message=message[:120].encode())


async def live(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS,
                               max_msg_size=MAX_CLIENT_MESSAGE_BYTES)
    if not ws.can_prepare(request).ok:
        raise InvalidArgument("GET /v1/live is a WebSocket: send an Upgrade request",
                              field="Upgrade")
    await ws.prepare(request)
    request.app[LIVE_SOCKETS_KEY].add(ws)
    p = await _authenticate(request, ws)
    if p is None:
        return ws
    # Operators (gateway/auth.py) also get nodes, events and alerts.
    operator = is_operator(p, request.app[CONFIG_KEY])
    await ws.send_json({"type": "hello", "tenant": p.tenant, "operator": operator})
    view = ClientView()
    reader = asyncio.get_running_loop().create_task(_read_client(ws, view))
    try:
        while not ws.closed and not reader.done():
            try:
                snapshot = await build_snapshot(request, p, operator, view.selected)
            except ThawError as exc:
                # The scheduler is away a moment: say so, keep the socket.
                snapshot = {"type": "warning", **error_body(exc.code, exc.message)}
            try:
                await ws.send_json(snapshot)
            except ConnectionError:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), PUSH_SECONDS)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        if not ws.closed:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server closing")
    return ws


@dataclass
class ClientView:
    """What the page shows, as it last told: `{"select": "<function name>"}`."""

    selected: str = ""


async def _read_client(ws: web.WebSocketResponse, view: ClientView) -> None:
    """Read what the client sends (so closes and pings are seen too); anything but a
    well-formed selection is ignored."""
    async for msg in ws:
        if msg.type == WSMsgType.ERROR:
            return
        if msg.type != WSMsgType.TEXT:
            continue
        with contextlib.suppress(ValueError):
            said = jsonbody.loads(msg.data)
            if isinstance(said, dict) and isinstance(said.get("select"), str):
                view.selected = said["select"][:MAX_NAME_LENGTH]


async def _close_live_sockets(app: web.Application) -> None:
    sockets = app[LIVE_SOCKETS_KEY]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")


def add_routes(app: web.Application) -> None:
    if STATS_KEY not in app:  # gateway/alerts/sources.py reads the same figures
        app[STATS_KEY] = FunctionStats()
    app[LIVE_SOCKETS_KEY] = weakref.WeakSet()
    app.on_shutdown.append(_close_live_sockets)
    app.router.add_get("/static/{file}", static_file)
    app.router.add_get("/v1/live", live)


OPENAPI_PATHS: dict[str, Any] = {
    "/static/{file}": {"get": {
        "summary": "The dashboard's script, style and vendored charting library",
        "security": PUBLIC,
        "parameters": [{"name": "file", "in": "path", "required": True,
                        "schema": {"type": "string", "enum": sorted(STATIC_FILES)}}],
        "responses": {
            "200": {"description": "The file.", "content": {
                "text/javascript": {"schema": {"type": "string"}},
                "text/css": {"schema": {"type": "string"}}}},
            "304": {"description": "Not modified since the copy the client has."},
            "404": _json(_ref("Error"), "No such file.")}}},
    "/v1/live": {"get": {
        "summary": "The dashboard's live feed (WebSocket)",
        "description": "Upgrade to a WebSocket, then send `{\"key\": \"<API key>\"}` as "
                       "the first message (never in the URL). A bad key gets an error "
                       "frame and close code 4401. Then about once a second a JSON "
                       "snapshot: the tenant's functions with live figures of this "
                       "gateway replica, recent invocations, and for operators nodes, "
                       "events and alerts.",
        "security": PUBLIC,
        "responses": {
            "101": {"description": "Switching to the WebSocket protocol."},
            "400": _json(_ref("Error"), "Not a WebSocket upgrade request.")}}},
}
