"""`thaw bench placement`: how long one placement decision takes (DESIGN.md §8, §10).

The bench builds the scheduler's own in-memory state with its real classes (PlaneState,
NodeView ledgers, FunctionPool instances, the pressure tracker fed by
Fleet.observe_pressure, snapshot holders, pinned tiers) for a synthetic cluster
(seeded: the same cluster each run) and times the decision a cold start makes in
Starts._place when something fits: Starts.choose (which nodes may take it, the
pinned / disk tier holding the snapshot, best fit, spread) plus the slice reservation
in the node's ledger. The decision does no DB or gRPC round trip (start_instance reads
the snapshot row once before it, outside the decision). Each reservation is released
after it is timed, so every decision sees the same cluster.

The figure is the CPU time of the deciding thread per decision (time.thread_time):
on a shared machine wall time also counts the moments the process was not running,
which at the 99th percentile is the operating system's scheduling, not placement;
wall-time percentiles are printed beside it ("wall").

The reference is the same decision, timed the same way in the same run, on a cluster
of REFERENCE_FUNCTIONS functions on REFERENCE_NODES nodes: the ratio says what scale
costs.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from sqlalchemy import create_engine

from thaw.core.spec import FunctionSpec, Resources
from thaw.proto import scheduler_pb2
from thaw.scheduler.bundles import BundleStore
from thaw.scheduler.events import EventLog
from thaw.scheduler.fleet import Fleet
from thaw.scheduler.instances import Instances
from thaw.scheduler.nodes import AgentClient, NodeView
from thaw.scheduler.plane_state import PlaneState, Timeouts
from thaw.scheduler.policy import PolicyConfig
from thaw.scheduler.pools import InstanceView
from thaw.scheduler.pressure import PINNED, Reading, device_resource
from thaw.scheduler.starts import Starts
from thaw.scheduler.states import FunctionState
from thaw.scheduler.store import FunctionRecord, Store
from thaw.scheduler.tiers import Tiers

GiB = 1024**3
DEVICES_PER_NODE = 8
DEVICE_BYTES = 80 * GiB
# Slice sizes of the synthetic functions (0 = CPU-only), roughly as deployed.
SLICE_SIZES = (0, 1 * GiB, 2 * GiB, 4 * GiB, 8 * GiB, 16 * GiB, 40 * GiB)
# Nodes whose pinned / disk tier hold a given function's snapshot.
PINNED_HOLDERS = 2
DISK_HOLDERS = 6
# Warm instances per function (spread over random nodes while their slices fit).
WARM_PER_FUNCTION = (0, 0, 1, 1, 2, 3)
DECISIONS = 20_000
REFERENCE_FUNCTIONS = 10
REFERENCE_NODES = 10
GOAL_P99_MS = 1.0
SEED = 5


class Cluster:
    """A control plane's in-memory state for `functions` functions on `nodes` nodes,
    and the Starts part deciding placement over it."""

    def __init__(self, functions: int, nodes: int, seed: int = SEED) -> None:
        rng = random.Random(seed)
        self._tmp = tempfile.TemporaryDirectory(prefix="thaw-bench-placement-")
        # Placement never calls an agent or the DB: a client is never made, and the
        # store only stands in for the one the state holds.
        state = PlaneState(
            store=Store(create_engine("sqlite://")), bundles=BundleStore(Path(self._tmp.name)),
            timeouts=Timeouts(1.0, 10.0, 60.0, 30.0), policy=PolicyConfig.model_validate({}),
            clock=time.monotonic, agent_client=lambda _address: cast(AgentClient, None),
            events=EventLog())
        self.state = state
        instances = Instances(state)
        fleet = Fleet(state, instances)
        self.starts = Starts(state, fleet, instances, Tiers(state))
        ids = [f"node-{n:04d}" for n in range(nodes)]
        for node_id in ids:
            devices = [scheduler_pb2.DeviceInfo(id=f"{node_id}-gpu{d}", kind="cuda",
                                                capacity_bytes=DEVICE_BYTES)
                       for d in range(DEVICES_PER_NODE)]
            state.nodes[node_id] = NodeView(
                id=node_id, control_address=f"{node_id}:7001", data_url=f"http://{node_id}",
                client=cast(AgentClient, None), devices=devices,
                starts_in_flight=rng.choice((0, 0, 0, 1, 2)),
                pinned=scheduler_pb2.PinnedTierInfo(capacity_bytes=256 * GiB))
        self.functions: list[tuple[FunctionRecord, str, set[str]]] = []
        for f in range(functions):
            need = rng.choice(SLICE_SIZES)
            spec = FunctionSpec(name=f"fn-{f}", handler="main:Model",
                                resources=Resources(gpu_memory=need))
            fn = FunctionRecord(id=f"fn-{f:05d}", tenant="bench", name=f"fn-{f}",
                                version=1, state=FunctionState.READY, reason="",
                                start_mode="restore", handler="main:Model",
                                bundle_digest="0" * 64, spec=spec,
                                snapshot_id=f"snap-{f:05d}", created_at=0.0, updated_at=0.0)
            holders = rng.sample(ids, min(nodes, DISK_HOLDERS))
            key = f"key-{f:05d}"
            for node_id in holders[:PINNED_HOLDERS]:
                state.nodes[node_id].pinned.snapshot_keys.append(key)
            state.holders[f"snap-{f:05d}"] = set(holders)
            pool = state.pool(fn)
            for w in range(rng.choice(WARM_PER_FUNCTION)):
                node = state.nodes[rng.choice(ids)]
                instance_id = f"inst-{f:05d}-{w}"
                if node.reserve(instance_id, need) is None:
                    continue
                pool.instances[instance_id] = InstanceView(
                    id=instance_id, function_id=fn.id, version=1, node_id=node.id,
                    start="restore", gpu_memory=need, inflight=rng.choice((0, 1)))
            self.functions.append((fn, key, set(holders)))
        for node in state.nodes.values():  # as Fleet.observe_pressure, without its logs
            readings = [Reading(device_resource(d.id), used, d.capacity_bytes)
                        for d, used in zip(node.devices, node.device_used(), strict=True)]
            readings.append(Reading(PINNED, node.pinned.used_bytes,
                                    node.pinned.capacity_bytes))
            state.pressure.observe(node.id, readings)

    def decide(self, index: int) -> tuple[float, float]:
        """One timed decision for function `index` (its slice released afterwards):
        (wall seconds, this thread's CPU seconds)."""
        fn, key, holders = self.functions[index]
        wall, cpu = time.perf_counter, time.thread_time
        began, began_cpu = wall(), cpu()
        node = self.starts.choose(fn, key, holders, set(), fn.spec.resources.gpu_memory)
        if node is not None:
            node.reserve("bench-start", fn.spec.resources.gpu_memory)
        took, took_cpu = wall() - began, cpu() - began_cpu
        if node is not None:
            node.unreserve("bench-start")
        return took, took_cpu

    def close(self) -> None:
        self._tmp.cleanup()


def _ms(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return {"p50_ms": round(statistics.median(samples) * 1e3, 4),
            "p99_ms": round(p99 * 1e3, 4), "max_ms": round(samples[-1] * 1e3, 4)}


def _time(functions: int, nodes: int, decisions: int) -> dict[str, Any]:
    """CPU time per decision (the figure), and wall time beside it."""
    cluster = Cluster(functions, nodes)
    try:
        rng = random.Random(SEED + 1)
        for _ in range(min(200, decisions)):  # warm the interpreter's caches
            cluster.decide(rng.randrange(functions))
        samples = [cluster.decide(rng.randrange(functions)) for _ in range(decisions)]
    finally:
        cluster.close()
    return {**_ms([cpu for _, cpu in samples]),
            "wall": _ms([wall for wall, _ in samples])}


def run_placement_bench(functions: int = 10_000, nodes: int = 1_000,
                        decisions: int = DECISIONS) -> dict[str, Any]:
    """p50/p99/max in milliseconds of one placement decision for a cold start among
    `functions` functions on `nodes` nodes, beside the same decision on the reference
    cluster, and their ratio."""
    if functions < 1 or nodes < 1 or decisions < 1:
        raise ValueError("functions, nodes and decisions must be at least 1")
    scale = _time(functions, nodes, decisions)
    reference = _time(REFERENCE_FUNCTIONS, REFERENCE_NODES, decisions)
    return {"functions": functions, "nodes": nodes, "decisions": decisions,
            "devices_per_node": DEVICES_PER_NODE, **scale,
            "reference": {"functions": REFERENCE_FUNCTIONS, "nodes": REFERENCE_NODES,
                          **reference},
            "ratio_p99": round(scale["p99_ms"] / reference["p99_ms"], 2)
            if reference["p99_ms"] > 0 else None,
            "goal_p99_ms": GOAL_P99_MS, "meets_goal": scale["p99_ms"] <= GOAL_P99_MS}


if __name__ == "__main__":
    import json

    print(json.dumps(run_placement_bench()))
