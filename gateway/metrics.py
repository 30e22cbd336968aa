"""Prometheus metrics of the gateway (thaw_ prefix, _seconds/_bytes/_total suffixes).

All of them are this replica's own: sum over replicas in queries.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from thaw.gateway.stream_metrics import StreamMetrics

# From a warm null call (well under a millisecond) to a cold start that imports a model.
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1, 2.5, 5, 10, 30, 60)
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.invocations = Counter(
            "thaw_invocations_total", "Invocations answered, by function, start kind and status",
            ["function", "start", "status"], registry=self.registry)
        self.stage_seconds = Histogram(
            "thaw_invocation_stage_seconds",
            "Time per invocation stage: queue (waiting for an instance), fetch/template/"
            "restore/setup (a cold start), run (the node's answer), total",
            ["stage"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.cold_starts = Counter(
            "thaw_cold_starts_total", "Cold starts by kind", ["kind"], registry=self.registry)
        self.queue_depth = Gauge(
            "thaw_queue_depth", "Requests waiting for an instance in this gateway, by function",
            ["function"], registry=self.registry)
        self.errors = Counter(
            "thaw_errors_total", "Error answers of the gateway, by code",
            ["code"], registry=self.registry)
        self.breaker_state = Gauge(
            "thaw_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            ["kind", "name"], registry=self.registry)
        self.lease_reuses = Counter(
            "thaw_lease_reuses_total", "Calls served on a kept lease, without an Acquire",
            registry=self.registry)
        self.pressure_level = Gauge(
            "thaw_memory_pressure_level",
            "Memory pressure per node resource: 0 normal, 1 pressure, 2 critical, 3 emergency",
            ["node", "resource"], registry=self.registry)
        self.pinned_used = Gauge(
            "thaw_pinned_used_bytes", "Bytes held in a node's pinned host-memory tier",
            ["node"], registry=self.registry)
        self.deploys = Counter(
            "thaw_deploys_total", "Bundles uploaded, by outcome", ["outcome"],
            registry=self.registry)
        self.streams = StreamMetrics(self.registry)
        """Streams' time to first token and between tokens (gateway/stream_metrics.py)."""
        # Children looked up once: labels() is a lock and a dict lookup per call.
        self._invocation_children: dict[tuple[str, str, int], Any] = {}
        self._stage_children = {stage: self.stage_seconds.labels(stage) for stage in
                                ("queue", "fetch", "template", "restore", "setup", "run",
                                 "total")}

    def count_invocation(self, function: str, start: str, status: int) -> None:
        key = (function, start, status)
        child = self._invocation_children.get(key)
        if child is None:
            child = self._invocation_children[key] = self.invocations.labels(
                function, start, str(status))
        child.inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        child = self._stage_children.get(stage)
        if child is None:
            child = self._stage_children[stage] = self.stage_seconds.labels(stage)
        child.observe(seconds)

    def set_queue_depth(self, function: str, depth: int) -> None:
        self.queue_depth.labels(function).set(depth)

    def set_breaker_state(self, kind: str, name: str, state: str) -> None:
        self.breaker_state.labels(kind, name).set(BREAKER_STATE_VALUES[state])
