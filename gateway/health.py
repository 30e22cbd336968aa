"""GET /livez: the gateway process is alive (its event loop answers); it checks no
dependency, so an unreachable scheduler never gets a gateway restarted. Readiness
(`/readyz`, app.py) is what depends on the scheduler."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from thaw.gateway.openapi import _json


async def livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/livez", livez)


OPENAPI_PATHS: dict[str, Any] = {
    "/livez": {"get": {
        "summary": "Liveness: the process answers (no dependency is checked)",
        "security": [],
        "responses": {"200": _json({"type": "object", "required": ["status"],
                                    "properties": {"status": {"type": "string",
                                                              "enum": ["alive"]}}},
                                   "Alive.")}}},
}
