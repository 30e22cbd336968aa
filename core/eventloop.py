"""The event loop the hot-path services (gateway, node agent) run on.

uvloop when it is installed and not turned off (THAW_UVLOOP=0): every invocation
crosses two aiohttp hops (gateway -> agent -> instance) and the loop's own overhead is
a large share of what the platform adds to a warm call (`thaw bench overhead`).
The scheduler keeps the standard loop: it is not on the per-call path.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def uvloop_enabled() -> bool:
    if os.environ.get("THAW_UVLOOP", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T]) -> T:
    if uvloop_enabled():
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
