"""Time to first token and time between tokens of streamed answers, per function.

Measured at the gateway as it relays a stream: the first chunk's time from the call's
admission (`thaw_stream_ttft_seconds`: queue, cold start and the handler's first item
together, what a client waits for), then the time from each chunk to the next
(`thaw_stream_tbt_seconds`). A chunk is what the gateway reads from the node and relays
at once: one item of a generator, or several when they come faster than they are
relayed. Labels: `function` (tenant/name, bounded by deploys as the other per-function
metrics are) and `kind`: sse, ndjson, or openai (the OpenAI routes' streams, where a
chunk counts once it holds a whole event). The cost per chunk is one clock read and
one histogram observation (prometheus_client's lock).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from thaw.gateway.sse import NDJSON_CONTENT_TYPE, SSE_CONTENT_TYPE

KINDS = ("sse", "ndjson", "openai")
# A first token from a warm instance's handler (milliseconds) to one after a cold start
# that loads a model (tens of seconds).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# A token of a fast model (a millisecond or less) to a slow step of a long generation.
TBT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
               5, 10)


class StreamClock:
    """One stream's clock: `tick()` as each chunk is relayed."""

    __slots__ = ("_ttft", "_tbt", "_last")

    def __init__(self, ttft: Any, tbt: Any, started: float) -> None:
        self._ttft = ttft
        self._tbt = tbt
        self._last = started
        """perf_counter of the previous chunk; the call's admission before the first."""

    def tick(self) -> None:
        now = time.perf_counter()
        if self._ttft is not None:
            self._ttft.observe(now - self._last)
            self._ttft = None
        else:
            self._tbt.observe(now - self._last)
        self._last = now


class StreamMetrics:
    """The two histograms, and each (function, kind)'s children looked up once."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ttft = Histogram(
            "thaw_stream_ttft_seconds",
            "Time from a streamed call's admission to its first chunk, by function and kind",
            ["function", "kind"], registry=registry, buckets=TTFT_BUCKETS)
        self.tbt = Histogram(
            "thaw_stream_tbt_seconds",
            "Time between a stream's chunks as the gateway relays them, by function and kind",
            ["function", "kind"], registry=registry, buckets=TBT_BUCKETS)
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def clock(self, function: str, kind: str | None, started: float) -> StreamClock | None:
        """A clock for one stream of `function` (tenant/name) admitted at `started`
        (perf_counter); None when the answer is no stream (`kind` None)."""
        if kind is None:
            return None
        key = (function, kind)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.ttft.labels(function, kind),
                                               self.tbt.labels(function, kind))
        return StreamClock(children[0], children[1], started)


def stream_kind(content_type: str) -> str | None:
    """sse or ndjson for a generator's stream; None for any other answer."""
    if content_type.startswith(SSE_CONTENT_TYPE):
        return "sse"
    if content_type.startswith(NDJSON_CONTENT_TYPE):
        return "ndjson"
    return None
