"""The activation budget: at most N restores fill slices over one PCIe link at a time,
the others wait their turn in arrival order (DESIGN.md §6, "concurrent restores per link
bounded").

A restore's device fill is a host-to-device copy at PCIe speed; restores that share a
link share its bandwidth. Past a few at once none of them gets faster, each one only
gets slower, and an instance that could have been serving waits behind the others. So
the agent admits a restore before filling its slice and lets it go once the instance is
up; the time spent waiting is the node's share of the `queue` stage of the start's
Server-Timing.

Links. On the cuda backend a link is what the GPUs behind one PCIe switch (or root
port) share, from NVML's topology (`thaw.platform.cuda.topology`); the slice names it
(`CudaSlice.pcie_link`). The host backend has no PCIe: its slices are filled by memcpy
over the node's one memory bus, so the whole node is one link, `HOST_LINK`.

Placement. A budget also answers how busy each link is (`load`: restores admitted,
waiting, and announced by `hold` for a slice just placed there), which the cuda backend
uses to put a restore on the GPU behind the least busy link. `hold` is taken when the
slice is placed, inside the backend's lock, so that a burst of starts spreads over the
links before any of them has reached `admit`; `admit(slice)` turns the hold into the
restore's place in line, and `drop` forgets a hold that no admission follows (the slice
was released first).

Size. `restore_concurrency_per_link` in the agent's settings; 0 derives it from the
measured host-to-device bandwidth (`derive_per_link`): as many restores as still get
`RESTORE_SHARE_GBPS` each. Where nothing can be measured (the host backend, a failed
measurement) it is `DEFAULT_RESTORES_PER_LINK`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import structlog

from thaw.core.errors import InvalidArgument
from thaw.platform.devices import DeviceBackend, Slice

log = structlog.get_logger()

# The host backend's one link: every host slice is filled over the node's memory bus.
HOST_LINK = "host"

# Restores per link where no bandwidth could be measured: a PCIe 4.0 x16 link's ~25 GB/s
# of host-to-device copies gives four restores about RESTORE_SHARE_GBPS each.
DEFAULT_RESTORES_PER_LINK = 4

# The bandwidth an admitted restore should still get when its link is shared: a 1.4 GB
# model then fills its slice in about a quarter of a second. A faster link admits more.
RESTORE_SHARE_GBPS = 6.0

# Bounds of a derived budget (a configured one may go higher): one restore always runs;
# past sixteen the per-restore costs outside the copy (forks, unpickling) dominate.
MAX_DERIVED_RESTORES_PER_LINK = 16


def derive_per_link(gbps: float | None) -> int:
    """Restores per link for a link measured at `gbps` GB/s host to device: as many as
    still get RESTORE_SHARE_GBPS each (at least 1, at most
    MAX_DERIVED_RESTORES_PER_LINK); DEFAULT_RESTORES_PER_LINK when unmeasured."""
    if gbps is None or not math.isfinite(gbps) or gbps <= 0:
        return DEFAULT_RESTORES_PER_LINK
    return max(1, min(MAX_DERIVED_RESTORES_PER_LINK, int(gbps // RESTORE_SHARE_GBPS)))


def slice_link(sl: Slice) -> str:
    """The link a slice is filled over: the cuda slice's PCIe link, else the node's."""
    link = getattr(sl, "pcie_link", None)
    return link if isinstance(link, str) and link else HOST_LINK


@dataclass(frozen=True, slots=True)
class LinkUsage:
    """One link's restores at a moment (telemetry, `thaw doctor gpu`)."""

    link: str
    limit: int
    admitted: int
    waiting: int
    held: int


@dataclass(eq=False)
class _Link:
    admitted: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    held: set[str] = field(default_factory=set)
    """Keys (slice ids) of restores placed on the link and not yet admitted."""


class ActivationBudget:
    """At most `per_link` restores admitted per link; the others wait in arrival order.

    Thread-safe for `hold`, `drop`, `load` and `usage` (the cuda backend calls them from
    the threads that place slices); `admit` runs on the agent's event loop.
    """

    def __init__(self, per_link: int = DEFAULT_RESTORES_PER_LINK, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._per_link = _checked(per_link)
        self._clock = clock
        self._links: dict[str, _Link] = {}
        self._owner: dict[str, str] = {}
        """hold key -> its link."""
        self._lock = threading.Lock()

    @property
    def per_link(self) -> int:
        return self._per_link

    def set_per_link(self, per_link: int) -> None:
        """Change the limit; a raised one admits waiting restores at once (call it on the
        event loop when restores may be waiting)."""
        with self._lock:
            self._per_link = _checked(per_link)
            for link in self._links.values():
                while link.waiters and link.admitted < self._per_link:
                    if self._wake_next(link):
                        link.admitted += 1

    @contextlib.asynccontextmanager
    async def admit(self, target: Slice | str) -> AsyncIterator[float]:
        """Hold a place among the restores of `target`'s link (a slice, or a link name)
        for the body; yields the seconds spent waiting for it (0.0 when admitted at
        once). A slice's hold (`hold(link, slice.id)`) becomes its place in line."""
        link_name = target if isinstance(target, str) else slice_link(target)
        key = "" if isinstance(target, str) else target.id
        waiter: asyncio.Future[None] | None = None
        with self._lock:
            if key:
                self._release_hold(key)
            link = self._links.setdefault(link_name, _Link())
            if link.admitted < self._per_link and not link.waiters:
                link.admitted += 1
            else:
                waiter = asyncio.get_running_loop().create_future()
                link.waiters.append(waiter)
        waited = 0.0
        if waiter is not None:
            started = self._clock()
            try:
                await waiter
            except asyncio.CancelledError:
                with self._lock:
                    if waiter.done() and not waiter.cancelled():
                        self._leave(link)  # admitted just as it was cancelled: pass it on
                    else:
                        with contextlib.suppress(ValueError):
                            link.waiters.remove(waiter)
                raise
            waited = self._clock() - started
            log.info("restore admitted after waiting", link=link_name, waited_s=round(waited, 4))
        try:
            yield waited
        finally:
            with self._lock:
                self._leave(link)

    def hold(self, link: str, key: str) -> None:
        """Count a restore on `link` from now on (placement sees it), until `admit` of
        the slice with id `key` takes it over or `drop(key)` forgets it."""
        with self._lock:
            self._release_hold(key)
            self._links.setdefault(link, _Link()).held.add(key)
            self._owner[key] = link

    def drop(self, key: str) -> None:
        """Forget the hold `key`, if there is one (its slice was released unfilled)."""
        with self._lock:
            self._release_hold(key)

    def load(self, link: str) -> int:
        """Restores admitted, waiting or held on `link`."""
        with self._lock:
            found = self._links.get(link)
            if found is None:
                return 0
            return found.admitted + len(found.waiters) + len(found.held)

    def usage(self) -> list[LinkUsage]:
        with self._lock:
            return [LinkUsage(name, self._per_link, link.admitted, len(link.waiters),
                              len(link.held))
                    for name, link in sorted(self._links.items())]

    # -- internals (under the lock) --

    def _release_hold(self, key: str) -> None:
        link = self._owner.pop(key, None)
        if link is not None:
            self._links[link].held.discard(key)

    def _leave(self, link: _Link) -> None:
        """An admitted restore is done: its place goes to the next waiter, if any."""
        if link.admitted > self._per_link:  # the limit was lowered meanwhile
            link.admitted -= 1
            return
        while link.waiters:
            if self._wake_next(link):
                return  # the place passes on: `admitted` stays
        link.admitted -= 1

    @staticmethod
    def _wake_next(link: _Link) -> bool:
        """Wake the first waiter still waiting; False if the queue held only cancelled
        ones (now gone)."""
        while link.waiters:
            waiter = link.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False


def _checked(per_link: int) -> int:
    if isinstance(per_link, bool) or not isinstance(per_link, int) or per_link < 1:
        raise InvalidArgument(f"restores per link must be an integer >= 1, got {per_link!r}",
                              field="restore_concurrency_per_link")
    return per_link


@runtime_checkable
class PlacesByLink(Protocol):
    """A device backend that places slices by link load (the cuda backend): it owns the
    node's budget and can measure its links."""

    @property
    def activation(self) -> ActivationBudget: ...

    def measure_h2d_gbps(self) -> float | None:
        """Host-to-device GB/s from page-locked memory on one link; None if it cannot
        be measured."""
        ...


def activation_budget(devices: DeviceBackend, configured: int = 0) -> ActivationBudget:
    """The node's activation budget: `configured` restores per link, or (0) derived from
    the backend's measured host-to-device bandwidth. The cuda backend's own budget (it
    places slices by it), else a new one over HOST_LINK. Blocking (it may copy to a
    GPU to measure): call it from a thread at startup."""
    if isinstance(configured, bool) or not isinstance(configured, int) or configured < 0:
        raise InvalidArgument(f"restore_concurrency_per_link must be an integer >= 0 "
                              f"(0 = derived), got {configured!r}",
                              field="restore_concurrency_per_link")
    if isinstance(devices, PlacesByLink):
        budget = devices.activation
        gbps = None if configured else devices.measure_h2d_gbps()
        budget.set_per_link(configured or derive_per_link(gbps))
        log.info("activation budget", restores_per_link=budget.per_link,
                 measured_h2d_gbps=round(gbps, 2) if gbps else None,
                 configured=bool(configured))
        return budget
    return ActivationBudget(configured or DEFAULT_RESTORES_PER_LINK)
