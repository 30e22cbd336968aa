"""Prometheus metrics of the gateway (thaw_ prefix, _seconds/_bytes/_total suffixes)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.invocations = Counter(
            "thaw_invocations_total", "Invocations answered, by function, start kind and status",
            ["function", "start", "status"], registry=self.registry)
        self.stage_seconds = Histogram(
            "thaw_invocation_stage_seconds", "Time per invocation stage",
            ["stage"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                     5, 10, 30, 60))
        self.cold_starts = Counter(
            "thaw_cold_starts_total", "Cold starts by kind", ["kind"], registry=self.registry)
        self.deploys = Counter(
            "thaw_deploys_total", "Bundles uploaded, by outcome", ["outcome"],
            registry=self.registry)
