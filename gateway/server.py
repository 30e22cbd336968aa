"""`thaw gateway`: serve the HTTP edge.

One port, two servers: plain function calls take the fast lane (gateway/lane.py, on
core/http1server.py); every other request, and its connection, goes to aiohttp's
server for the app (gateway/app.py). `fast_lane = false` in [gateway] serves
everything with aiohttp."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import cast

import structlog
from aiohttp import web

from thaw.core.config import GatewayConfig
from thaw.core.http1server import SENT, Answer, HTTPServer, Request, Response, Router
from thaw.gateway.app import errors_middleware, make_app
from thaw.gateway.invoke import invoke
from thaw.gateway.lane import (
    FN_PREFIX,
    LANE_MAX_BODY_BYTES,
    LaneRequest,
    claims,
    function_of,
    head_headers,
)
from thaw.gateway.state import CONFIG_KEY

log = structlog.get_logger()
# On SIGTERM, requests still running (long streams) get this long before their
# connections are closed; `thaw up` waits longer than this (ops/services.py
# SHUTDOWN_GRACE_SECONDS) before it kills the gateway.
SHUTDOWN_SECONDS = 10.0


async def serve(config: GatewayConfig, port_file: Path | None = None) -> None:
    app = make_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
    await runner.setup()
    lane: HTTPServer | None = None
    if app[CONFIG_KEY].fast_lane:
        server = runner.server
        assert server is not None  # set up above
        most = min(LANE_MAX_BODY_BYTES, app[CONFIG_KEY].max_body_bytes)
        lane = HTTPServer(lane_router(app), most, claim=claims(most), fallback=server)
        port = await lane.start(config.gateway_host, config.gateway_port)
    else:
        site = web.TCPSite(runner, config.gateway_host, config.gateway_port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    if port_file is not None:
        port_file.write_text(str(port))
    log.info("gateway listening", url=f"http://{config.gateway_host}:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway stopping")
    if lane is not None:
        await lane.close(SHUTDOWN_SECONDS)
    await runner.cleanup()


def lane_router(app: web.Application) -> Router:
    """The fast lane's one route: the function URL, through the same middleware and
    handler as aiohttp's route for it (gateway/lane.py)."""

    async def call(request: Request) -> Answer:
        found = function_of(request.path)
        assert found is not None  # the claim checked it
        lane = LaneRequest(request, app, *found)
        response = await errors_middleware(cast(web.Request, lane), invoke)
        if response.prepared:  # a stream, written as it came (LaneStreamResponse)
            return SENT
        return _whole(cast(web.Response, response))

    router = Router()
    router.add_prefix("POST", FN_PREFIX, call)
    return router


def _whole(response: web.Response) -> Response:
    body = response.body
    if not isinstance(body, bytes):  # the route answers with bytes only
        raise TypeError(f"unexpected response body {type(body).__name__}")
    headers = head_headers(response.headers)
    if "Content-Type" not in response.headers:
        content_type = response.content_type
        if response.charset:
            content_type += f"; charset={response.charset}"
        headers["Content-Type"] = content_type
    return Response(response.status, body, headers)
