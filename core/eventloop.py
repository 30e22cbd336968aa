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
from typing import Any, BinaryIO, TypeVar

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


def read_pipe_file(fd: int) -> BinaryIO:
    """A file object for `loop.connect_read_pipe` that gets `fd` closed exactly once.

    uvloop (0.23) hands the descriptor number itself to libuv, which closes it when the
    transport closes, and the file object it keeps then closes the same number again,
    by then possibly another thread's file (MagicStack/uvloop#763: it closed a chunk
    file under the agent's snapshot build). Under uvloop the file object must not own
    the descriptor; under the standard loop the transport closes it through the file.
    """
    return os.fdopen(fd, "rb", closefd=not _is_uvloop(asyncio.get_running_loop()))


def _is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")
