"""A sync call's cost in its answer's head: `X-Thaw-Cost: 0.000123456 USD`.

Sent when the call asks (`X-Thaw-Want-Cost: 1`) or the gateway's `cost_header` setting
is on, and only while prices are set. Only a whole (buffered) answer can carry it: its
cost is known once the body has arrived, before the head goes out. A streamed answer's
head leaves before its last chunk, so it has none; its cost is in /v1/usage. The figure
is the call priced at answer time (core/prices.py); the metered record is measured a
moment later, when the exchange is settled, so its stored cost may differ from the
header's in the last digits of a per-second price.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

from thaw.core.errors import ThawError
from thaw.core.prices import cost_nanos, money
from thaw.gateway.dispatch import Exchange
from thaw.gateway.state import CONFIG_KEY
from thaw.gateway.usage import METERING_KEY

WANT_COST_HEADER = "X-Thaw-Want-Cost"
COST_HEADER = "X-Thaw-Cost"


def wants_cost(request: Any) -> bool:
    """Whether this call's answer should carry its cost (a dict look-up or two)."""
    if request.headers.get(WANT_COST_HEADER) == "1":
        return True
    return bool(getattr(request.app[CONFIG_KEY], "cost_header", False))


async def add_cost(request: Any, ex: Exchange, headers: MutableMapping[str, str]) -> None:
    """Set X-Thaw-Cost on a whole answer's headers, when prices are set and the
    function's size is known (a function deleted meanwhile answers none)."""
    metering = request.app.get(METERING_KEY)
    if metering is None or metering.meter.prices.free:
        return
    wall = time.perf_counter() - ex.sent
    try:
        size = await metering.meter.size_of(ex.call.tenant, ex.call.name)
    except ThawError:
        return  # the scheduler is away: the answer goes without its cost
    prices = metering.meter.prices
    nanos = cost_nanos(prices, wall, size.gpu_memory_bytes, size.memory_bytes)
    headers[COST_HEADER] = f"{money(nanos)} {prices.currency}"
