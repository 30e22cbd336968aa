"""The agent's `node` stage: its share of a call, what the instance's stages leave of
the time the data plane held it (platform/dataplane.py add_node_stage)."""

from __future__ import annotations

import time

from thaw.gateway.stats import parse_server_timing
from thaw.platform.dataplane import add_node_stage


def test_the_node_stage_is_the_data_planes_time_less_the_instances_stages() -> None:
    headers = {"Server-Timing": "run;dur=100.000"}
    began = time.perf_counter() - 0.3
    add_node_stage(headers, began)
    held_ms = (time.perf_counter() - began) * 1000.0
    stages = parse_server_timing(headers["Server-Timing"])
    assert list(stages) == ["run", "node"]
    assert 199.99 <= stages["node"] <= held_ms - 100.0 + 0.01  # less the run's 100 ms


def test_without_instance_stages_the_node_has_all_of_it_and_never_goes_negative() -> None:
    headers: dict[str, str] = {}
    began = time.perf_counter() - 0.05
    add_node_stage(headers, began)
    held_ms = (time.perf_counter() - began) * 1000.0
    assert 49.99 <= parse_server_timing(headers["Server-Timing"])["node"] <= held_ms + 0.01
    # An instance stage longer than the hop itself (or junk in it) gives 0, not < 0.
    junk = {"Server-Timing": "run;dur=5000, x;dur=nan, y;dur=oops"}
    add_node_stage(junk, time.perf_counter())
    assert junk["Server-Timing"].endswith(", node;dur=0.00")
