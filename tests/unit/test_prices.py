"""Cost arithmetic (core/prices.py): exact Decimal, rounded half up once to nano-units,
nothing priced when no price is set, the per-call price alone, and the settings."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from thaw.core.config import GatewayConfig
from thaw.core.prices import FREE, GiB, Prices, cost_nanos, money, prices_of


def test_no_price_set_costs_nothing() -> None:
    assert FREE.free
    assert cost_nanos(FREE, 3600.0, 80 * GiB, 64 * GiB) == 0
    assert not Prices(per_call=Decimal("0.000000001")).free


def test_per_call_price_alone_ignores_time_and_size() -> None:
    prices = Prices(per_call=Decimal("0.0004"))
    assert cost_nanos(prices, 0.0) == 400_000
    assert cost_nanos(prices, 120.0, 8 * GiB, GiB) == 400_000


def test_each_quantity_is_priced() -> None:
    prices = Prices(cpu_second=Decimal("0.00001"), gpu_gib_second=Decimal("0.0001"),
                    memory_gib_second=Decimal("0.000002"))
    # 2 s: CPU 0.00002, a 256 MiB slice 0.25 * 2 * 0.0001 = 0.00005, 512 MiB of host
    # memory 0.5 * 2 * 0.000002 = 0.000002.
    assert cost_nanos(prices, 2.0, GiB // 4, GiB // 2) == 20_000 + 50_000 + 2_000
    # No slice and no memory limit: only the CPU-seconds.
    assert cost_nanos(prices, 2.0) == 20_000


def test_rounding_is_half_up_once_per_call() -> None:
    one_nano_a_second = Prices(cpu_second=Decimal("0.000000001"))
    assert cost_nanos(one_nano_a_second, 0.5) == 1
    assert cost_nanos(one_nano_a_second, 0.49) == 0
    assert cost_nanos(one_nano_a_second, 2.5) == 3
    # The sum is rounded, not each part: 0.4 + 0.4 nanos is 1, not 0.
    split = Prices(cpu_second=Decimal("0.0000000004"),
                   gpu_gib_second=Decimal("0.0000000004"))
    assert cost_nanos(split, 1.0, GiB) == 1
    # A negative wall time (a clock step) costs no time.
    assert cost_nanos(Prices(per_call=Decimal(1), cpu_second=Decimal(1)), -5.0) == 10**9


def test_costs_sum_exactly_where_floats_would_not() -> None:
    prices = Prices(per_call=Decimal("0.1"))
    nanos = sum(cost_nanos(prices, 0.0) for _ in range(10))
    assert nanos == 10**9 and money(nanos) == "1.000000000"
    assert sum(0.1 for _ in range(10)) != 1.0  # why the sums are integers


def test_money_is_an_exact_decimal_string() -> None:
    assert money(0) == "0.000000000"
    assert money(1) == "0.000000001"
    assert money(123_456_789_012) == "123.456789012"


def test_prices_come_from_the_gateway_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert prices_of(GatewayConfig()).free
    monkeypatch.setenv("THAW_PRICE_GPU_GIB_SECOND", "0.0000123")
    monkeypatch.setenv("THAW_PRICE_CURRENCY", "EUR")
    prices = prices_of(GatewayConfig(price_per_call="0.25"))
    assert prices.gpu_gib_second == Decimal("0.0000123")
    assert prices.per_call == Decimal("0.25")
    assert (prices.cpu_second, prices.memory_gib_second) == (0, 0)
    assert prices.currency == "EUR" and not prices.free


def test_a_bad_price_names_its_key() -> None:
    with pytest.raises(ValidationError, match="price_cpu_second"):
        GatewayConfig(price_cpu_second="-1")
    with pytest.raises(ValidationError, match="price_per_call"):
        GatewayConfig(price_per_call="nan")
    with pytest.raises(ValidationError, match="price_currency"):
        GatewayConfig(price_currency="US D")
