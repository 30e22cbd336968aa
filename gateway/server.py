"""`thaw gateway`: serve the HTTP edge."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import structlog
from aiohttp import web

from thaw.core.config import GatewayConfig
from thaw.gateway.app import make_app

log = structlog.get_logger()
# On SIGTERM, requests still running (long streams) get this long before their
# connections are closed; `thaw up` waits longer than this (ops/services.py
# SHUTDOWN_GRACE_SECONDS) before it kills the gateway.
SHUTDOWN_SECONDS = 10.0


async def serve(config: GatewayConfig, port_file: Path | None = None) -> None:
    runner = web.AppRunner(make_app(config), access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
    await runner.setup()
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
    await runner.cleanup()
