"""Function logs: GET /v1/functions/{name}/logs. Every ready node keeps its
instances' output per function (platform/logs.py, served at the data plane's
GET /logs); this merges them for the caller's tenant, oldest first, as NDJSON,
and with follow=true keeps the connection open and passes new lines on as the
nodes send them.

`?request=ID` (and `GET /v1/invocations/{id}/logs` for a stored invocation, whose id
is its request id) answers one call's lines: what its handler printed while it ran
(`request` on each line; docs/logs.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from thaw.core.errors import InvalidArgument, NotFound
from thaw.gateway.caller import principal_of, require_logs
from thaw.gateway.openapi import _errors
from thaw.gateway.state import GATEWAY_KEY
from thaw.gateway.stored.runner import RUNNER_KEY
from thaw.proto import scheduler_pb2

log = structlog.get_logger()

NDJSON = "application/x-ndjson"
# Lines sent without follow when the caller does not say (`tail`); also the most one
# may ask for (a node keeps at most platform/logs.py DEFAULT_MAX_LINES per function).
DEFAULT_TAIL = 100
MAX_TAIL = 10_000
# A node's data plane that does not answer a logs request within this is skipped.
NODE_LOGS_TIMEOUT_SECONDS = 10.0
SESSION_KEY = web.AppKey("logs_session", aiohttp.ClientSession)
# Request ids as the gateway keeps them (gateway/app.py REQUEST_ID_PATTERN) and stored
# invocations' ids.
REQUEST_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# A call keeps at most this many lines on its node, its truncation line included
# (platform/calllogs.py MAX_CALL_LINES); a call's lines come whole by default.
CALL_MAX_LINES = 10_000


def _tail(request: web.Request, default: int = DEFAULT_TAIL) -> int:
    raw = request.query.get("tail", str(default))
    try:
        tail = int(raw)
    except ValueError as exc:
        raise InvalidArgument("tail must be an integer", field="tail") from exc
    if not 0 <= tail <= MAX_TAIL:
        raise InvalidArgument(f"tail must be in [0, {MAX_TAIL}]", field="tail")
    return tail


def _flag(request: web.Request, key: str) -> bool:
    raw = request.query.get(key, "false").lower()
    if raw not in ("1", "true", "yes", "0", "false", "no"):
        raise InvalidArgument(f"{key} must be true or false", field=key)
    return raw in ("1", "true", "yes")


def _node_urls(nodes: list[scheduler_pb2.NodeInfo]) -> list[str]:
    # Cordoned nodes still run instances (and hold their logs); lost ones answer nothing.
    return [n.data_url for n in nodes if n.state != "lost" and n.data_url]


def _request_id(request: web.Request) -> str:
    """The call asked for with ?request= ("" for none)."""
    given = request.query.get("request", "")
    if given and not REQUEST_PATTERN.match(given):
        raise InvalidArgument("request must be a request id (X-Request-ID)",
                              field="request")
    return given


async def _node_lines(session: aiohttp.ClientSession, url: str, function: str,
                      tail: int, server_hostname: str | None, call: str = ""
                      ) -> list[dict[str, Any]]:
    params = {"function": function, "tail": str(tail)}
    if call:
        params["request"] = call
    try:
        async with session.get(f"{url}/logs", params=params,
                               server_hostname=server_hostname,
                               timeout=aiohttp.ClientTimeout(
                                   total=NODE_LOGS_TIMEOUT_SECONDS)) as resp:
            if resp.status != 200:
                return []
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.info("node logs unavailable", node=url, error=str(exc))
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def _follow_node(session: aiohttp.ClientSession, url: str, function: str,
                       since: float, queue: asyncio.Queue[dict[str, Any]],
                       server_hostname: str | None) -> None:
    try:
        async with session.get(f"{url}/logs", params={
                "function": function, "since": repr(since), "follow": "1", "tail": "0"},
                server_hostname=server_hostname,
                timeout=aiohttp.ClientTimeout(total=None,
                                              sock_connect=NODE_LOGS_TIMEOUT_SECONDS)) as resp:
            async for raw in resp.content:
                if raw.strip():
                    await queue.put(json.loads(raw))
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.info("node log stream ended", node=url, error=str(exc))


async def function_logs(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    p = await principal_of(request)
    require_logs(p)
    name = request.match_info["name"]
    call = _request_id(request)
    tail = _tail(request, CALL_MAX_LINES if call else DEFAULT_TAIL)
    follow = _flag(request, "follow")
    if call and follow:
        raise InvalidArgument("follow cannot be combined with request: a call's lines "
                              "are read once it has printed them", field="follow")
    await gw.scheduler.get_function(p.tenant, name)  # 404 for another tenant's name
    return await _answer(request, f"{p.tenant}/{name}", tail, follow, call)


async def invocation_logs(request: web.Request) -> web.StreamResponse:
    """A stored invocation's lines: its id is the request id its call ran under."""
    p = await principal_of(request)
    require_logs(p)
    invocation_id = request.match_info["id"]
    if not invocation_id.startswith("inv_") or not REQUEST_PATTERN.match(invocation_id):
        raise NotFound(f"invocation {invocation_id[:80]} not found", field="id")
    runner = request.app.get(RUNNER_KEY)
    if runner is None:
        raise NotFound(f"invocation {invocation_id} not found", field="id")
    inv = await runner.client.get(p.tenant, invocation_id)  # 404 for another tenant's
    return await _answer(request, f"{p.tenant}/{inv.function}",
                         _tail(request, CALL_MAX_LINES), False, inv.id)


async def _answer(request: web.Request, function: str, tail: int, follow: bool,
                  call: str) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    urls = _node_urls(await gw.scheduler.list_nodes())
    session = request.app[SESSION_KEY]
    name_checked = gw.nodes.server_hostname
    per_node = await asyncio.gather(*(_node_lines(session, u, function, tail, name_checked,
                                                  call)
                                      for u in urls))
    lines = sorted((ln for found in per_node for ln in found),
                   key=lambda ln: (ln["time"], ln["seq"]))[-tail:] if tail else []
    for ln in lines:
        ln.pop("seq", None)  # per node: means nothing once merged
    response = web.StreamResponse(headers={"Content-Type": NDJSON,
                                           "Cache-Control": "no-store"})
    await response.prepare(request)
    await response.write("".join(json.dumps(ln) + "\n" for ln in lines).encode())
    if not follow:
        await response.write_eof()
        return response
    # From the newest line sent (or now): a node's clock is its own, so a line may
    # repeat at the seam; better than one lost.
    since = lines[-1]["time"] if lines else time.time()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
    followers = [asyncio.create_task(_follow_node(session, u, function, since, queue,
                                                  name_checked))
                 for u in urls]
    sent = {(ln["instance"], ln["time"], ln["line"]) for ln in lines[-50:]}
    try:
        while True:
            ln = await queue.get()
            ln.pop("seq", None)
            if (ln["instance"], ln["time"], ln["line"]) in sent:
                continue
            await response.write(json.dumps(ln).encode() + b"\n")
    except ConnectionError:
        pass  # the caller left
    finally:
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
    return response


async def _session(app: web.Application):  # type: ignore[no-untyped-def]
    # The data planes' TLS is the invocation client's: its context (the gateway's
    # certificate, the platform's CA) and the agent's name checked on every node.
    nodes = app[GATEWAY_KEY].nodes
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        ssl=nodes.tls if nodes.tls is not None else True))
    app[SESSION_KEY] = session
    yield
    with contextlib.suppress(Exception):
        await session.close()


def add_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(_session)
    app.router.add_get("/v1/functions/{name}/logs", function_logs)
    app.router.add_get("/v1/invocations/{id}/logs", invocation_logs)


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/functions/{name}/logs": {"get": {
        "summary": "A function's logs (its instances' output and the runtime's records "
                   "of them), merged across nodes, oldest first.",
        "description": "NDJSON, one object a line: time (unix seconds), function, "
                       "instance, stream (output | runtime), line, request (the request "
                       "id of the call that printed it; \"\" outside calls). With "
                       "follow=true the connection stays open and new lines follow as "
                       "they are printed. With request=ID only that call's lines come "
                       "(all of them unless tail says fewer).",
        "parameters": [
            {"name": "name", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}},
            {"name": "tail", "in": "query", "schema": {
                "type": "integer", "minimum": 0, "maximum": MAX_TAIL,
                "default": DEFAULT_TAIL}},
            {"name": "follow", "in": "query", "schema": {"type": "boolean",
                                                        "default": False}},
            {"name": "request", "in": "query", "schema": {
                "type": "string", "pattern": REQUEST_PATTERN.pattern}},
        ],
        "responses": {
            "200": {"description": "Log lines as NDJSON.",
                    "content": {NDJSON: {"schema": {"type": "string"}}}},
            **_errors(400, 401, 403, 404, 503),
        },
    }},
    "/v1/invocations/{id}/logs": {"get": {
        "summary": "What a stored invocation's handler printed while it ran.",
        "description": "NDJSON as GET /v1/functions/{name}/logs?request=ID, for the "
                       "invocation's function and request id (its id).",
        "parameters": [
            {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "tail", "in": "query", "schema": {
                "type": "integer", "minimum": 0, "maximum": MAX_TAIL,
                "default": CALL_MAX_LINES}},
        ],
        "responses": {
            "200": {"description": "Log lines as NDJSON.",
                    "content": {NDJSON: {"schema": {"type": "string"}}}},
            **_errors(400, 401, 403, 404, 503),
        },
    }},
}
