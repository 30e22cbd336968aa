"""What the alert sink tests share: a local HTTP receiver on loopback (aiohttp, port 0),
waiting for its requests to arrive, and the sinks' delivery counters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sized
from contextlib import asynccontextmanager

from aiohttp import web

from thaw.gateway.alert_sinks import SinkMetrics

# The receiver answers every request within this; a test waiting longer is broken.
WAIT_SECONDS = 20.0


@asynccontextmanager
async def loopback(take: Callable[[web.Request], Awaitable[web.Response]],
                   ) -> AsyncIterator[str]:
    """Serve every POST with `take` on 127.0.0.1; yields the server's base URL."""
    app = web.Application()
    app.router.add_post("/{path:.*}", take)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def wait_count(items: Sized, count: int, arrived: asyncio.Event) -> None:
    """Wait until `items` holds `count` entries (`arrived` is set on each new one)."""
    async def enough() -> None:
        while len(items) < count:
            arrived.clear()
            await arrived.wait()
    await asyncio.wait_for(enough(), WAIT_SECONDS)


def counted(metrics: SinkMetrics, sink: str, outcome: str) -> float:
    return metrics.notices.labels(sink, outcome)._value.get()  # type: ignore[attr-defined]
