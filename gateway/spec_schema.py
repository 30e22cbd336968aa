"""`GET /v1/schema/thaw.toml`: the JSON Schema every thaw.toml is validated against
(core/spec.py's models), public like /openapi.json, so editors and `thaw deploy
--dry-run` check a file before it is uploaded. docs/thaw-toml.md says which limits
the scheduler adds at deploy (quota, largest node)."""

from __future__ import annotations

import functools
import json
from typing import Any

from aiohttp import web

from thaw.core.spec import thaw_toml_schema
from thaw.gateway.openapi import PUBLIC

SCHEMA_PATH = "/v1/schema/thaw.toml"
SCHEMA_CONTENT_TYPE = "application/schema+json"


@functools.cache
def _schema_body() -> bytes:
    return json.dumps(thaw_toml_schema(), indent=2, sort_keys=True).encode()


async def schema_view(request: web.Request) -> web.Response:
    return web.Response(body=_schema_body(), content_type=SCHEMA_CONTENT_TYPE,
                        headers={"Cache-Control": "public, max-age=300"})


def add_routes(app: web.Application) -> None:
    app.router.add_get(SCHEMA_PATH, schema_view)


OPENAPI_PATHS: dict[str, Any] = {
    SCHEMA_PATH: {"get": {
        "summary": "The JSON Schema of thaw.toml (every bound a deploy is checked against; "
                   "the tenant's quota and the largest node are checked at deploy too)",
        "security": PUBLIC,
        "responses": {"200": {"description": "JSON Schema (draft 2020-12).", "content": {
            SCHEMA_CONTENT_TYPE: {"schema": {"type": "object"}}}}}}},
}
