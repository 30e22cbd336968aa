"""The dashboard's rolling windows (gateway/stats.py) keep only their window, whether a
dashboard reads them or not: the gateway's memory follows the window."""

from __future__ import annotations

from thaw.gateway.stats import BUCKET_SECONDS, WINDOW_SECONDS, FunctionStats


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_recording_forgets_calls_and_functions_past_the_window_unread() -> None:
    clock = Clock()
    stats = FunctionStats(clock=clock)
    for n in range(3):
        stats.record("dev/idle", f"old{n}", 200, "warm", "", 1.0)
    stats.record("dev/busy", "old", 200, "warm", "", 1.0)
    clock.now += WINDOW_SECONDS + 1
    stats.record("dev/busy", "new", 200, "warm", "", 1.0)
    # No summary was asked for: recording alone dropped what the window no longer holds.
    assert stats.functions() == ["dev/busy"]
    assert [i.id for i in stats._calls["dev/busy"]] == ["new"]


def test_a_sweep_runs_at_most_once_a_bucket() -> None:
    clock = Clock()
    began = clock.now
    stats = FunctionStats(clock=clock)
    stats.record("dev/a", "first", 200, "warm", "", 1.0)
    clock.now = began + WINDOW_SECONDS - 1
    stats.record("dev/b", "1", 200, "warm", "", 1.0)  # a sweep: dev/a still in the window
    clock.now = began + WINDOW_SECONDS + 1
    stats.record("dev/b", "2", 200, "warm", "", 1.0)  # within a bucket: no sweep
    assert sorted(stats.functions()) == ["dev/a", "dev/b"]
    clock.now = began + WINDOW_SECONDS - 1 + BUCKET_SECONDS
    stats.record("dev/b", "3", 200, "warm", "", 1.0)  # a bucket later: swept
    assert stats.functions() == ["dev/b"]
