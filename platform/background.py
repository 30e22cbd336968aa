"""Work on a node that nobody waits on (the scheduler's keep-pinned prewarm after a
snapshot's first restore there), kept out of the way of instances serving calls.

Two measures, because one alone does not hold everywhere:
- it waits until no call has been in flight and no instance starting on the node for
  a moment (`when_quiet`), so a restored instance's first call, whose restore asked
  for that prewarm, does not share the CPU with it;
- it runs on a thread at nice 19 (`in_background`). Nice orders threads of one
  scheduling group only: where each session is a group of its own (autogroup, as with
  instances the sandbox starts in new sessions), the groups share CPU evenly whatever
  their threads' nice, which is why the wait comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

BACKGROUND_NICE = 19
# The longest a background pass waits for a quiet node: under steady traffic it runs
# anyway, at background priority.
QUIET_WAIT_SECONDS = 30.0
# How long the node must have been idle: the pass that a restore starts is asked for
# before the gateway has sent that instance its first call (a few milliseconds later).
QUIET_SETTLE_SECONDS = 1.0
QUIET_POLL_SECONDS = 0.05


async def when_quiet(busy: Callable[[], bool], limit: float = QUIET_WAIT_SECONDS,
                     settle: float = QUIET_SETTLE_SECONDS,
                     poll: float = QUIET_POLL_SECONDS,
                     clock: Callable[[], float] = time.monotonic) -> float:
    """Return once `busy()` has been false for `settle` seconds on end, or `limit`
    seconds passed; the seconds waited."""
    started = last_busy = clock()
    while clock() - last_busy < settle and clock() - started < limit:
        if busy():
            last_busy = clock()
        await asyncio.sleep(poll)
    return clock() - started


def in_background(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` on a thread of its own at BACKGROUND_NICE (a per-thread attribute on
    Linux, inherited by the threads it starts, such as the blobstore's workers), so the
    caller's thread keeps its priority; returns what fn returns, or raises what it
    raised."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="thaw-background",
                            initializer=_lower_priority) as pool:
        return pool.submit(fn, *args).result()


def _lower_priority() -> None:
    with contextlib.suppress(OSError):  # a refusal leaves the thread as it was
        os.setpriority(os.PRIO_PROCESS, 0, BACKGROUND_NICE)  # 0: the calling thread
