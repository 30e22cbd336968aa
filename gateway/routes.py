"""The gateway's feature modules beyond the core routes in app.py, in one table.

Each module listed provides:
- `add_routes(app: web.Application) -> None`: its routes, and any background work as
  `app.cleanup_ctx` entries (they run after the core components are built, so
  `app[GATEWAY_KEY]` is there);
- `OPENAPI_PATHS: dict[str, Any]`: its part of the OpenAPI document's `paths` (the
  openapi test checks the document names exactly the routes served).

The OpenAPI document is composed here too, from the core document and this table.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

from aiohttp import web

from thaw.gateway import (
    alerts,
    audit,
    dashboard,
    environments,
    files,
    fndocs,
    health,
    images,
    invoke,
    logs,
    mcp,
    oip,
    predictions,
    priority,
    schedules,
    secrets,
    snapshots,
    spec_schema,
    tenancy,
    traces,
    usage,
    versions,
    volumes,
)
from thaw.gateway.openapi import document_with
from thaw.gateway.stored import routes as stored


class Feature(Protocol):
    """A feature module (see the module's docstring)."""

    OPENAPI_PATHS: dict[str, Any]

    def add_routes(self, app: web.Application) -> None: ...


FEATURES: tuple[Feature, ...] = (
    health,
    stored,
    tenancy,
    audit,
    usage,
    logs,
    snapshots,
    environments,
    dashboard,
    alerts,
    priority,
    versions,
    spec_schema,
    secrets,
    volumes,
    images,
    oip,
    fndocs,
    predictions,
    files,
    mcp,
    schedules,
    traces,
    # Last: every method but POST on a function URL, after the routes served under one.
    invoke,
)


def add_routes(app: web.Application) -> None:
    """Every feature's routes, in the table's order."""
    for feature in FEATURES:
        feature.add_routes(app)


@functools.cache
def build_document() -> dict[str, Any]:
    """The OpenAPI document of every route the app serves."""
    return document_with(feature.OPENAPI_PATHS for feature in FEATURES)


async def openapi_view(request: web.Request) -> web.Response:
    return web.json_response(build_document())
