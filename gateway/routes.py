"""The gateway's feature modules beyond the core routes in app.py.

Each module named here provides:
- `add_routes(app: web.Application) -> None`: its routes, and any background work as
  `app.cleanup_ctx` entries (they run after the core components are built, so
  `app[GATEWAY_KEY]` is there);
- `OPENAPI_PATHS: dict[str, Any]`: its part of the OpenAPI document's `paths` (the
  openapi test checks the document names exactly the routes served).
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODULES: tuple[str, ...] = (
    "thaw.gateway.invocations",
    "thaw.gateway.tenancy",
    "thaw.gateway.audit",
    "thaw.gateway.usage",
    "thaw.gateway.logs",
    "thaw.gateway.snapshots",
    "thaw.gateway.dashboard",
    "thaw.gateway.alerts",
    "thaw.gateway.priority",
    "thaw.gateway.versions",
)


def modules() -> list[ModuleType]:
    return [importlib.import_module(name) for name in MODULES]
