"""Live per-function statistics for the dashboard (gateway/dashboard.py).

Per gateway replica: each replica sees only the invocations it served, and the
numbers start afresh when it restarts. Prometheus (/metrics) is where figures of the
whole fleet are summed; this is the second-by-second view of one edge.

The hot path only appends one small record to a bounded deque (`record`) and, at
most once a bucket, drops the calls past the window of every function, so that what is
kept follows the window whether a dashboard asks or not (a function no longer called
is forgotten); the Server-Timing text is parsed and percentiles computed when a
dashboard asks (`function_summary`, about once a second per open dashboard).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

# The rolling window the dashboard shows.
WINDOW_SECONDS = 300.0
# The charts' time resolution: WINDOW_SECONDS / BUCKET_SECONDS points per series.
BUCKET_SECONDS = 5.0
# Invocations kept per function at most, whatever the window: bounds memory under load
# (past this many calls in WINDOW_SECONDS the figures cover a shorter span).
MAX_KEPT_PER_FUNCTION = 20_000
# How many of the latest cold starts the stage chart shows.
COLD_STARTS_SHOWN = 20
# "Rate" without a series: calls over the last this many seconds.
RATE_SECONDS = 60.0
# Stages of the gateway's Server-Timing (gateway/dispatch.py Exchange.server_timing plus
# the instance's run): what the cold-start chart stacks, in order. "queue" is every wait
# before the start: the scheduler's for a place and the node's activation budget's
# (dispatch.merged_stages adds them up).
STAGES = ("queue", "fetch", "template", "restore", "fork", "prefault", "launch", "import",
          "setup", "run")
COLD_KINDS = ("restore", "fresh")


@dataclass(frozen=True, slots=True)
class Invocation:
    """One served call, as recorded on the hot path (nothing parsed yet)."""

    id: str
    function: str
    """tenant/name"""
    time: float
    """Unix time the answer's head was sent (or the call failed)."""
    status: int
    start: str
    """warm | restore | fresh, or none when no instance was reached."""
    server_timing: str
    ms: float
    """What the gateway measured, from the request's arrival to its end."""
    tenant_error: bool = False
    """An error the handler chose to answer (HTTPError, InvalidInput): its status is
    kept, but it is the function working, not failing."""

    @property
    def cold(self) -> bool:
        return self.start in COLD_KINDS

    @property
    def error(self) -> bool:
        """A failure of the function or the platform (error rates, the alerts)."""
        return self.status >= 500 and not self.tenant_error

    def stages(self) -> dict[str, float]:
        """Milliseconds per Server-Timing stage ("total" left out)."""
        return parse_server_timing(self.server_timing)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "function": self.function, "time": round(self.time, 3),
                "status": self.status, "start": self.start, "ms": round(self.ms, 2),
                "stages": self.stages()}


def parse_server_timing(header: str) -> dict[str, float]:
    """`queue;dur=1.2, run;dur=3.4` -> {"queue": 1.2, "run": 3.4}; malformed parts and
    "total" are skipped (the gateway's own measurement is Invocation.ms)."""
    out: dict[str, float] = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        name = name.strip()
        if not name or name == "total":
            continue
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                try:
                    ms = float(value)
                except ValueError:
                    break
                if math.isfinite(ms) and ms >= 0:
                    out[name] = out.get(name, 0.0) + ms
                break
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list; 0 for none."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class FunctionStats:
    """Rolling windows per function, fed by the gateway's request middleware."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 window: float = WINDOW_SECONDS, bucket: float = BUCKET_SECONDS) -> None:
        self.clock = clock
        self.window = window
        self.bucket = bucket
        self._calls: dict[str, deque[Invocation]] = {}
        self._swept = clock()

    def record(self, function: str, request_id: str, status: int, start: str,
               server_timing: str, ms: float, tenant_error: bool = False) -> None:
        calls = self._calls.get(function)
        if calls is None:
            calls = self._calls[function] = deque(maxlen=MAX_KEPT_PER_FUNCTION)
        now = self.clock()
        calls.append(Invocation(request_id, function, now, status, start, server_timing, ms,
                                tenant_error))
        if now - self._swept >= self.bucket:
            self._swept = now
            for name in list(self._calls):
                self._prune(name, now)

    def _prune(self, function: str, now: float) -> deque[Invocation] | None:
        calls = self._calls.get(function)
        if calls is None:
            return None
        horizon = now - self.window
        while calls and calls[0].time < horizon:
            calls.popleft()
        if not calls:
            del self._calls[function]
            return None
        return calls

    def functions(self) -> list[str]:
        return list(self._calls)

    def recent(self, functions: Iterable[str], limit: int = 50) -> list[Invocation]:
        """The latest invocations of these functions, newest first."""
        now = self.clock()
        merged: list[Invocation] = []
        for function in functions:
            calls = self._prune(function, now)
            if calls is not None:
                merged.extend(list(calls)[-limit:])
        merged.sort(key=lambda i: i.time, reverse=True)
        return merged[:limit]

    def function_summary(self, function: str, charts: bool = True) -> dict[str, Any]:
        """Figures over the window for one function and, with `charts`, the series and
        cold starts its charts draw."""
        now = self.clock()
        calls = self._prune(function, now)
        snapshot = list(calls) if calls is not None else []
        latencies = sorted(c.ms for c in snapshot)
        errors = sum(1 for c in snapshot if c.error)
        cold_by_kind = {kind: 0 for kind in COLD_KINDS}
        for c in snapshot:
            if c.cold:
                cold_by_kind[c.start] += 1
        recent_calls = sum(1 for c in snapshot if c.time >= now - RATE_SECONDS)
        summary = {
            "window_seconds": self.window,
            "invocations": len(snapshot),
            "rate_per_second": round(recent_calls / RATE_SECONDS, 3),
            "p50_ms": round(percentile(latencies, 0.50), 2),
            "p99_ms": round(percentile(latencies, 0.99), 2),
            "error_rate": round(errors / len(snapshot), 4) if snapshot else 0.0,
            "cold_starts": cold_by_kind,
        }
        if charts:
            colds = [c for c in snapshot if c.cold][-COLD_STARTS_SHOWN:]
            summary["cold_start_stages"] = [
                {"id": c.id, "time": round(c.time, 3), "start": c.start,
                 "stages": c.stages()} for c in colds]
            summary["series"] = self._series(snapshot, now)
        return summary

    def _series(self, calls: list[Invocation], now: float) -> dict[str, list[float]]:
        """Per bucket, oldest first: its end time, calls per second, p50 and p99 (ms),
        errors per second. Empty buckets have rate 0 and latencies 0."""
        count = max(1, int(self.window // self.bucket))
        end = math.floor(now / self.bucket) * self.bucket + self.bucket
        first = end - count * self.bucket
        buckets: list[list[float]] = [[] for _ in range(count)]
        failed = [0] * count
        for c in calls:
            index = int((c.time - first) // self.bucket)
            if 0 <= index < count:
                buckets[index].append(c.ms)
                failed[index] += c.error
        times, rate, p50, p99, err = [], [], [], [], []
        for index, values in enumerate(buckets):
            values.sort()
            times.append(first + (index + 1) * self.bucket)
            rate.append(round(len(values) / self.bucket, 3))
            p50.append(round(percentile(values, 0.50), 2))
            p99.append(round(percentile(values, 0.99), 2))
            err.append(round(failed[index] / self.bucket, 3))
        return {"time": times, "rate": rate, "p50_ms": p50, "p99_ms": p99, "errors": err}


STATS_KEY = web.AppKey("function_stats", FunctionStats)
