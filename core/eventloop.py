"""The event loop the hot-path services (gateway, node agent) run on.

uvloop when it is installed and the service's `uvloop` setting is on (THAW_UVLOOP=0
turns it off): every invocation
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


def uvloop_enabled(wanted: bool = True) -> bool:
    """Whether `run` uses uvloop: wanted (the service's setting) and installed."""
    if not wanted:
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run `main` to completion on a new loop: uvloop's when `use_uvloop` and installed."""
    if uvloop_enabled(use_uvloop):
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
