"""Stream timing (gateway/stream_metrics.py): the first chunk feeds the TTFT histogram
from the call's admission, each later one the TBT histogram from the chunk before, per
function and kind; only streams get a clock."""

from __future__ import annotations

import time

from thaw.gateway.metrics import GatewayMetrics
from thaw.gateway.stream_metrics import stream_kind


def sample(metrics: GatewayMetrics, name: str, function: str, kind: str) -> float:
    value = metrics.registry.get_sample_value(name, {"function": function, "kind": kind})
    return value or 0.0


def test_first_chunk_is_ttft_and_the_rest_tbt() -> None:
    metrics = GatewayMetrics()
    admitted = time.perf_counter() - 2.0  # admitted two seconds ago
    clock = metrics.streams.clock("t/llm", "sse", admitted)
    clock.tick()
    assert sample(metrics, "thaw_stream_ttft_seconds_count", "t/llm", "sse") == 1
    assert sample(metrics, "thaw_stream_ttft_seconds_sum", "t/llm", "sse") >= 2.0
    assert sample(metrics, "thaw_stream_tbt_seconds_count", "t/llm", "sse") == 0
    clock.tick()
    clock.tick()
    assert sample(metrics, "thaw_stream_ttft_seconds_count", "t/llm", "sse") == 1
    assert sample(metrics, "thaw_stream_tbt_seconds_count", "t/llm", "sse") == 2
    # Between chunks, not since admission: far below the two seconds before the first.
    assert sample(metrics, "thaw_stream_tbt_seconds_sum", "t/llm", "sse") < 2.0
    # Another kind of the same function is its own series.
    metrics.streams.clock("t/llm", "openai", time.perf_counter()).tick()
    assert sample(metrics, "thaw_stream_ttft_seconds_count", "t/llm", "openai") == 1
    assert sample(metrics, "thaw_stream_ttft_seconds_count", "t/llm", "sse") == 1


def test_only_streams_get_a_clock() -> None:
    assert stream_kind("text/event-stream; charset=utf-8") == "sse"
    assert stream_kind("application/x-ndjson") == "ndjson"
    assert stream_kind("application/octet-stream") is None
    metrics = GatewayMetrics()
    assert metrics.streams.clock("t/f", None, 0.0) is None
    clock = metrics.streams.clock("t/f", stream_kind("application/x-ndjson"),
                                  time.perf_counter())
    assert clock is not None
    clock.tick()
    assert sample(metrics, "thaw_stream_ttft_seconds_count", "t/f", "ndjson") == 1
