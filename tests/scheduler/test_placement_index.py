"""Starts.choose (the placement index) decides exactly as choose_node over every
candidate node, on random clusters built with the scheduler's real classes, after
random changes of the kinds the control plane makes (reservations, starts in flight,
node states, heartbeats, memory pressure, pinned tiers)."""

from __future__ import annotations

import random

import pytest

from thaw.bench.placement import PINNED, Cluster, Reading, device_resource
from thaw.proto import scheduler_pb2
from thaw.scheduler.nodes import DOCKER_RUNTIME, NodeView
from thaw.scheduler.placement import choose_node
from thaw.scheduler.states import NodeState


def _full_scan(cluster: Cluster, index: int, excluded: set[str]) -> str | None:
    fn, key, holders = cluster.functions[index]
    chosen = choose_node(cluster.starts._candidates(fn, key, holders, excluded),
                         fn.spec.resources.gpu_memory)
    return None if chosen is None else chosen.node_id


def _fast(cluster: Cluster, index: int, excluded: set[str]) -> str | None:
    fn, key, holders = cluster.functions[index]
    node = cluster.starts.choose(fn, key, holders, excluded, fn.spec.resources.gpu_memory)
    return None if node is None else node.id


def _observe(cluster: Cluster, node: NodeView) -> None:
    readings = [Reading(device_resource(d.id), used, d.capacity_bytes)
                for d, used in zip(node.devices, node.device_used(), strict=True)]
    readings.append(Reading(PINNED, node.pinned.used_bytes, node.pinned.capacity_bytes))
    cluster.state.pressure.observe(node.id, readings)


def _mutate(cluster: Cluster, rng: random.Random, step: int) -> None:
    nodes = list(cluster.state.nodes.values())
    node = rng.choice(nodes)
    what = rng.randrange(9)
    if what == 0:
        node.reserve(f"extra-{step}", rng.choice((1, 4, 16, 40)) * 1024**3)
    elif what == 1 and node.slices:
        node.unreserve(rng.choice(list(node.slices)))
    elif what == 2:
        node.starts_in_flight = max(0, node.starts_in_flight + rng.choice((-1, 1)))
    elif what == 3:
        node.state = rng.choice((NodeState.READY, NodeState.READY, NodeState.CORDONED,
                                 NodeState.LOST))
    elif what == 4:  # a heartbeat: devices reported again, some memory foreign
        devices = [scheduler_pb2.DeviceInfo(id=d.id, kind=d.kind,
                                            capacity_bytes=d.capacity_bytes,
                                            used_bytes=rng.randrange(0, d.capacity_bytes))
                   for d in node.devices]
        node.take_report(devices)
    elif what == 5:
        _fn, key, _holders = rng.choice(cluster.functions)
        node.pin(key)
    elif what == 6 and node.pinned.snapshot_keys:
        node.unpin(rng.choice(list(node.pinned.snapshot_keys)))
    elif what == 7:
        node.slices.clear()
    else:
        node.pinned = scheduler_pb2.PinnedTierInfo(capacity_bytes=node.pinned.capacity_bytes)
    _observe(cluster, node)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_choose_matches_choose_node_over_every_node(seed: int) -> None:
    cluster = Cluster(functions=60, nodes=40, seed=seed)
    rng = random.Random(seed)
    ids = list(cluster.state.nodes)
    chosen = 0
    try:
        for step in range(400):
            index = rng.randrange(len(cluster.functions))
            excluded = set(rng.sample(ids, rng.choice((0, 0, 1, 5))))
            expected = _full_scan(cluster, index, excluded)
            assert _fast(cluster, index, excluded) == expected, (step, index, excluded)
            chosen += expected is not None
            _mutate(cluster, rng, step)
    finally:
        cluster.close()
    assert chosen > 100  # the comparison ran over real choices, not only "nothing fits"


def test_choose_sees_a_node_after_each_kind_of_change() -> None:
    cluster = Cluster(functions=1, nodes=2, seed=7)
    try:
        fn, _key, _holders = cluster.functions[0]
        a, b = cluster.state.nodes.values()
        # No snapshot anywhere: the choice is by starts in flight, then best fit.
        a.starts_in_flight, b.starts_in_flight = 0, 1
        a.slices.clear()
        b.slices.clear()
        need = 8 * 1024**3

        def pick() -> str | None:
            node = cluster.starts.choose(fn, "", set(), set(), need)
            return None if node is None else node.id

        assert pick() == a.id
        a.starts_in_flight = 2  # busier now
        assert pick() == b.id
        b.state = NodeState.CORDONED
        assert pick() == a.id
        a.state = NodeState.LOST
        assert pick() is None
        b.state = NodeState.READY
        assert pick() == b.id
        for d in range(len(b.devices)):  # b fills up: nothing fits anywhere
            b.reserve(f"fill-{d}", b.device_free()[d])
        assert pick() is None
        b.slices.clear()
        assert pick() == b.id
        b.runtime = DOCKER_RUNTIME
        assert pick() == b.id
    finally:
        cluster.close()
