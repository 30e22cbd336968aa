"""Function logs: GET /v1/functions/{name}/logs. Every ready node keeps its
instances' output per function (platform/logs.py, served at the data plane's
GET /logs); this merges them for the caller's tenant, oldest first, as NDJSON,
and with follow=true keeps the connection open and passes new lines on as the
nodes send them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from thaw.core.errors import InvalidArgument
from thaw.gateway.caller import principal_of, require_logs
from thaw.gateway.openapi import _errors
from thaw.gateway.state import GATEWAY_KEY
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


def _tail(request: web.Request) -> int:
    raw = request.query.get("tail", str(DEFAULT_TAIL))
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


async def _node_lines(session: aiohttp.ClientSession, url: str, function: str,
                      tail: int, server_hostname: str | None) -> list[dict[str, Any]]:
    try:
        async with session.get(f"{url}/logs", params={"function": function,
                                                      "tail": str(tail)},
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
    tail, follow = _tail(request), _flag(request, "follow")
    await gw.scheduler.get_function(p.tenant, name)  # 404 for another tenant's name
    function = f"{p.tenant}/{name}"
    urls = _node_urls(await gw.scheduler.list_nodes())
    session = request.app[SESSION_KEY]
    name_checked = gw.nodes.server_hostname
    per_node = await asyncio.gather(*(_node_lines(session, u, function, tail, name_checked)
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


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/functions/{name}/logs": {"get": {
        "summary": "A function's logs (its instances' output and the runtime's records "
                   "of them), merged across nodes, oldest first.",
        "description": "NDJSON, one object a line: time (unix seconds), function, "
                       "instance, stream (output | runtime), line. With follow=true the "
                       "connection stays open and new lines follow as they are printed.",
        "parameters": [
            {"name": "name", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}},
            {"name": "tail", "in": "query", "schema": {
                "type": "integer", "minimum": 0, "maximum": MAX_TAIL,
                "default": DEFAULT_TAIL}},
            {"name": "follow", "in": "query", "schema": {"type": "boolean",
                                                        "default": False}},
        ],
        "responses": {
            "200": {"description": "Log lines as NDJSON.",
                    "content": {NDJSON: {"schema": {"type": "string"}}}},
            **_errors(400, 401, 403, 404, 503),
        },
    }},
}
