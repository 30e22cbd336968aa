"""gateway/mcp_bridge.py: an ASGI app answering an aiohttp request, whole or streamed,
with the request's body, headers and the aiohttp request itself in its scope."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from thaw.gateway.mcp_bridge import AIOHTTP_REQUEST, serve


async def _asgi(scope: Any, receive: Any, send: Any) -> None:
    message = await receive()
    body = message["body"]
    assert isinstance(scope[AIOHTTP_REQUEST], web.Request)
    headers = [(b"content-type", b"text/plain"), (b"x-seen", dict(scope["headers"])[b"x-in"]),
               (b"content-length", b"999")]  # aiohttp sets the real length itself
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    if body == b"stream":
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        # After the answer, the next message is the end of the exchange.
        assert (await receive())["type"] == "http.disconnect"
        return
    await send({"type": "http.response.body", "body": body[::-1]})


async def _view(request: web.Request) -> web.StreamResponse:
    return await serve(_asgi, request, await request.read(), "/asgi")


async def _exchange() -> list[tuple[int, str, str, str]]:
    app = web.Application()
    app.router.add_post("/bridge", _view)
    out = []
    async with TestClient(TestServer(app)) as client:
        for body in (b"whole", b"stream"):
            resp = await client.post("/bridge", data=body, headers={"X-In": "yes"})
            out.append((resp.status, resp.headers["X-Seen"], resp.headers["Content-Type"],
                        await resp.text()))
    return out


def test_an_asgi_app_answers_through_aiohttp_whole_and_streamed() -> None:
    whole, streamed = asyncio.run(_exchange())
    assert whole == (201, "yes", "text/plain", "elohw")
    assert streamed == (201, "yes", "text/plain", "one two three")
