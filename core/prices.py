"""What a call costs: the operator's prices applied to what the gateway metered.

Money is never a float sum. Prices are Decimals (parsed from the settings' text), a
call's cost is computed exactly in Decimal and rounded once, half up, to whole
nano-units of the currency (1e-9), an integer that is stored with the call's usage
record and summed as an integer. A price change applies to the calls metered after it
(the gateway that metered a call priced it); the stored costs of earlier calls stay as
they were.

The quantities priced, per call (gateway/usage.py measures them):
- one call: `price_per_call`;
- CPU-seconds: the call's wall seconds (the instance it held has no CPU quota, so a
  call counts as one CPU for as long as it held the instance): `price_cpu_second`;
- GPU GiB-seconds: the function's slice memory (`resources.gpu_memory`) in GiB times
  the wall seconds: `price_gpu_gib_second`;
- memory GiB-seconds: the function's host-memory limit (`resources.memory`; none set
  is none priced) in GiB times the wall seconds: `price_memory_gib_second`.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

GiB = 1024**3
NANOS_PER_UNIT = 10**9
"""Cost is kept in integer nano-units of the currency: a 50 ms call on a 2 GiB slice at
a few dollars per GPU-hour costs well under a micro-unit, which micro-units would round
away on every call."""
_NANO = Decimal(1)
ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Prices:
    """The operator's prices, in `currency` units (all zero: nothing is priced)."""

    per_call: Decimal = ZERO
    cpu_second: Decimal = ZERO
    gpu_gib_second: Decimal = ZERO
    memory_gib_second: Decimal = ZERO
    currency: str = "USD"

    @property
    def free(self) -> bool:
        """No price is set: every cost is 0 and none is shown."""
        return not (self.per_call or self.cpu_second or self.gpu_gib_second
                    or self.memory_gib_second)


FREE = Prices()


def prices_of(config: object) -> Prices:
    """The prices a gateway's settings (core/config_fields.py `price_*`) set."""
    def price(name: str) -> Decimal:
        value = getattr(config, name, ZERO)
        return value if isinstance(value, Decimal) else Decimal(str(value))
    return Prices(per_call=price("price_per_call"), cpu_second=price("price_cpu_second"),
                  gpu_gib_second=price("price_gpu_gib_second"),
                  memory_gib_second=price("price_memory_gib_second"),
                  currency=str(getattr(config, "price_currency", "USD")))


def cost_nanos(prices: Prices, wall_seconds: float, gpu_memory_bytes: int = 0,
               memory_bytes: int = 0) -> int:
    """A call's cost in nano-units: exact Decimal arithmetic, rounded half up once."""
    if prices.free:
        return 0
    # Decimal(float) is the float's exact value: no rounding before the last step.
    wall = Decimal(max(wall_seconds, 0.0))
    per_second = prices.cpu_second
    if gpu_memory_bytes > 0 and prices.gpu_gib_second:
        per_second += Decimal(gpu_memory_bytes) / GiB * prices.gpu_gib_second
    if memory_bytes > 0 and prices.memory_gib_second:
        per_second += Decimal(memory_bytes) / GiB * prices.memory_gib_second
    total = prices.per_call + wall * per_second
    return int((total * NANOS_PER_UNIT).quantize(_NANO, rounding=ROUND_HALF_UP))


def money(nanos: int) -> str:
    """Nano-units as a decimal string of currency units, exact (9 places)."""
    units, rest = divmod(nanos, NANOS_PER_UNIT)
    return f"{units}.{rest:09d}"
