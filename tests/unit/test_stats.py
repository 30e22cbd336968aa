"""The dashboard's rolling windows (gateway/stats.py), on a fake clock."""

from __future__ import annotations

import pytest

from thaw.gateway.stats import FunctionStats, parse_server_timing, percentile


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_server_timing_is_parsed_into_stages() -> None:
    header = "queue;dur=1.50, fetch;dur=2, restore;dur=30.25, run;dur=4.000, total;dur=40"
    assert parse_server_timing(header) == {"queue": 1.5, "fetch": 2.0, "restore": 30.25,
                                           "run": 4.0}
    assert parse_server_timing("") == {}
    assert parse_server_timing("run;dur=abc, ;dur=3, queue;desc=x, x;dur=-1, y;dur=nan") == {}


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) == 0.0


def test_a_summary_counts_rate_latency_errors_and_cold_starts() -> None:
    clock = Clock()
    stats = FunctionStats(clock=clock)
    for i in range(98):
        stats.record("dev/echo", f"r{i}", 200, "warm", "queue;dur=0.1, run;dur=1", 2.0)
    stats.record("dev/echo", "cold1", 200, "restore",
                 "queue;dur=1, fetch;dur=5, restore;dur=20, run;dur=3", 30.0)
    stats.record("dev/echo", "boom", 502, "fresh", "queue;dur=1, import;dur=9, setup;dur=40", 60.0)
    s = stats.function_summary("dev/echo")
    assert s["invocations"] == 100
    assert s["p50_ms"] == 2.0 and s["p99_ms"] == 30.0
    assert s["error_rate"] == pytest.approx(0.01)
    assert s["rate_per_second"] == pytest.approx(100 / 60, abs=1e-3)
    assert s["cold_starts"] == {"restore": 1, "fresh": 1}
    assert [c["id"] for c in s["cold_start_stages"]] == ["cold1", "boom"]
    assert s["cold_start_stages"][0]["stages"] == {"queue": 1.0, "fetch": 5.0,
                                                  "restore": 20.0, "run": 3.0}
    series = s["series"]
    assert len(series["time"]) == 60 and series["rate"][-1] == pytest.approx(100 / 5)
    assert series["errors"][-1] == pytest.approx(1 / 5)
    assert sum(series["rate"][:-1]) == 0


def test_a_summary_without_charts_has_the_figures_only() -> None:
    stats = FunctionStats(clock=Clock())
    stats.record("dev/echo", "r1", 200, "restore", "queue;dur=1, restore;dur=2", 5.0)
    s = stats.function_summary("dev/echo", charts=False)
    assert "series" not in s and "cold_start_stages" not in s
    assert s["invocations"] == 1 and s["cold_starts"]["restore"] == 1


def test_the_window_forgets_old_calls_and_functions() -> None:
    clock = Clock()
    stats = FunctionStats(clock=clock)
    stats.record("dev/a", "old", 200, "warm", "", 1.0)
    clock.now += 301
    stats.record("dev/b", "new", 200, "warm", "", 1.0)
    assert stats.function_summary("dev/a")["invocations"] == 0
    assert stats.functions() == ["dev/b"]


def test_recent_merges_functions_newest_first_and_stays_within_the_tenant() -> None:
    clock = Clock()
    stats = FunctionStats(clock=clock)
    for i, function in enumerate(["dev/a", "dev/b", "acme/c", "dev/a"]):
        clock.now += 1
        stats.record(function, f"r{i}", 200, "warm", "run;dur=1", 1.0)
    recent = stats.recent([f for f in stats.functions() if f.startswith("dev/")], limit=2)
    assert [r.id for r in recent] == ["r3", "r1"]
    assert recent[0].to_json()["stages"] == {"run": 1.0}
