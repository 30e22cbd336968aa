"""The node client closes kept connections idle past IDLE_SECONDS by itself (one
timer), so a burst of calls leaves no descriptors behind once it is over."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from thaw.core import http1
from thaw.gateway.nodeclient import NodeClient


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


@pytest.fixture
async def url() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/echo"
    await runner.cleanup()


async def _burst(client: NodeClient, url: str, calls: int) -> None:
    async def one(n: int) -> None:
        answer = await client.post(url, str(n).encode(), {})
        assert await answer.read() == str(n).encode()
    await asyncio.gather(*(one(n) for n in range(calls)))


async def test_the_sweep_closes_connections_idle_past_the_limit_and_keeps_the_rest(
        url: str) -> None:
    client = NodeClient()
    await _burst(client, url, 3)
    kept = [conn for idle in client._idle.values() for conn in idle]
    assert len(kept) == 3 and client._sweeper is not None  # armed by the first put back
    old, fresh = kept[:2], kept[2]
    for conn in old:
        conn.idle_since = time.monotonic() - http1.IDLE_SECONDS - 1
    client._sweeper.cancel()
    client._sweep()
    assert [conn for idle in client._idle.values() for conn in idle] == [fresh]
    assert all(conn.writer.is_closing() for conn in old)
    assert not fresh.writer.is_closing()
    assert client._sweeper is not None  # still one kept: armed again
    fresh.idle_since -= http1.IDLE_SECONDS + 1
    client._sweeper.cancel()
    client._sweep()
    assert client._idle == {} and client._sweeper is None  # nothing kept: no timer
    assert fresh.writer.is_closing()
    # The next call connects afresh and arms the sweep again.
    await _burst(client, url, 1)
    assert client._sweeper is not None
    await client.close()
    assert client._sweeper is None


async def test_the_timer_runs_the_sweep(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "SWEEP_SECONDS", 0.0)
    monkeypatch.setattr(http1, "IDLE_SECONDS", 0.0)
    client = NodeClient()
    await _burst(client, url, 2)
    for _ in range(100):  # each turn of the loop runs the timers that are due
        if not client._idle:
            break
        await asyncio.sleep(0)
    assert client._idle == {} and client._sweeper is None
    await client.close()
