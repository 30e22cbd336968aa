"""`thaw gateway`: serve the HTTP edge.

Two listeners: the gateway's port (the dashboard origin: dashboard, API, function URLs
sandboxed) and the function origin's (function URLs and invocation results only, as
the functions answer them; gateway/origins.py). On each, two servers: plain function
calls take the fast lane (gateway/lane.py, on core/http1server.py); every other
request, and its connection, goes to aiohttp's server for the app (gateway/app.py).
`fast_lane = false` in [gateway] serves everything with aiohttp. Both servers hold
clients to the same bounds (gateway/limits.py): head sizes, timeouts, and one cap on
connections per address shared by both ports."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import cast

import structlog
from aiohttp import web

from thaw.core.config import GatewayConfig
from thaw.core.http1limits import AddressCap
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
from thaw.gateway.limits import address_cap, aiohttp_protocol, http_limits
from thaw.gateway.origins import (
    FUNCTION_ORIGIN_KEY,
    ON_FUNCTION_ORIGIN_KEY,
    apply_security_headers,
)
from thaw.gateway.state import CONFIG_KEY

log = structlog.get_logger()
# On SIGTERM, requests still running (long streams) get this long before their
# connections are closed; `thaw up` waits longer than this (ops/services.py
# SHUTDOWN_GRACE_SECONDS) before it kills the gateway.
SHUTDOWN_SECONDS = 10.0


async def serve(config: GatewayConfig, port_file: Path | None = None,
                function_port_file: Path | None = None) -> None:
    """Serve until SIGINT/SIGTERM; the bound ports go to the files given (the
    gateway's to `port_file`, the function origin's to `function_port_file`)."""
    app = make_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
    await runner.setup()
    cap = address_cap(config)
    main, port = await _listen(app, runner, config.gateway_host, config.gateway_port,
                               cap=cap)
    log.info("gateway listening", url=f"http://{config.gateway_host}:{port}")
    function_host = config.function_host or config.gateway_host
    functions, function_port = await _listen(app, runner, function_host,
                                             config.function_listen_port, True, cap)
    if function_port == port:  # two hosts, one port number: requests not told apart
        raise OSError(f"the function origin got port {port}, the gateway's too; set "
                      "function_port to another one")
    origin = app[FUNCTION_ORIGIN_KEY]
    origin.port = function_port
    # Function URLs name the host the caller used, unless the listener has its own.
    origin.host = "" if function_host in (*WILDCARD_HOSTS, config.gateway_host) \
        else function_host
    log.info("function origin listening", url=f"http://{function_host}:{function_port}/fn/")
    if function_port_file is not None:
        function_port_file.write_text(str(function_port))
    if port_file is not None:  # last: who waits on it finds both
        port_file.write_text(str(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway stopping")
    for listener in (main, functions):
        if isinstance(listener, HTTPServer):
            await listener.close(SHUTDOWN_SECONDS)
        else:
            listener.close()
    await runner.cleanup()


async def _listen(app: web.Application, runner: web.AppRunner, host: str, port: int,
                  function_origin: bool = False, cap: AddressCap | None = None
                  ) -> tuple[Listener, int]:
    """One listener of the app (fast lane in front of aiohttp, or aiohttp alone) and
    the port it bound."""
    server = runner.server
    assert server is not None  # set up
    config = app[CONFIG_KEY]
    aiohttp_connection = aiohttp_protocol(server, config, cap)
    if config.fast_lane:
        most = min(LANE_MAX_BODY_BYTES, config.max_body_bytes)
        lane = HTTPServer(lane_router(app, function_origin), most, claim=claims(most),
                          fallback=aiohttp_connection, limits=http_limits(config),
                          cap=cap)
        return lane, await lane.start(host, port)
    plain = await asyncio.get_running_loop().create_server(aiohttp_connection, host, port)
    return plain, int(plain.sockets[0].getsockname()[1])


Listener = HTTPServer | asyncio.Server
# Binding these means "every address": function URLs then name the caller's host.
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def lane_router(app: web.Application, function_origin: bool = False) -> Router:
    """The fast lane's one route: the function URL, through the same middleware and
    handler as aiohttp's route for it (gateway/lane.py)."""

    async def call(request: Request) -> Answer:
        found = function_of(request.path)
        assert found is not None  # the claim checked it
        lane = LaneRequest(request, app, *found)
        lane[ON_FUNCTION_ORIGIN_KEY] = function_origin
        response = await errors_middleware(cast(web.Request, lane), invoke)
        if response.prepared:  # a stream, written as it came (LaneStreamResponse)
            return SENT
        return _whole(cast(web.Response, response), request.path, function_origin)

    router = Router()
    router.add_prefix("POST", FN_PREFIX, call)
    return router


def _whole(response: web.Response, path: str = "", function_origin: bool = False
           ) -> Response:
    body = response.body
    if not isinstance(body, bytes):  # the route answers with bytes only
        raise TypeError(f"unexpected response body {type(body).__name__}")
    apply_security_headers(response.headers, path, function_origin)
    headers = head_headers(response.headers)
    if "Content-Type" not in response.headers:
        content_type = response.content_type
        if response.charset:
            content_type += f"; charset={response.charset}"
        headers["Content-Type"] = content_type
    return Response(response.status, body, headers)
