"""Memory pressure per device and per pinned tier (issue 5, item 3): the level rule
(property-based), the tracker as a state machine, and the graduated eviction the
control plane drives from it."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.scheduler.conftest import Cluster, GiB
from thaw.proto import manifest_pb2, scheduler_pb2
from thaw.scheduler.events import EventKind
from thaw.scheduler.pressure import (
    PINNED,
    PressureLevel,
    PressureTracker,
    Reading,
    Thresholds,
    next_level,
)
from thaw.scheduler.service import SchedulerService
from thaw.scheduler.states import FunctionState, SnapshotState
from thaw.snapshotter.manifest import manifest_key

T = Thresholds(pressure=0.80, critical=0.90, emergency=0.97, hysteresis=0.05)
levels = st.sampled_from(list(PressureLevel))
fractions = st.floats(min_value=0.0, max_value=1.2, allow_nan=False)
thresholds = st.tuples(st.floats(0.05, 0.6), st.floats(0.01, 0.2), st.floats(0.01, 0.2),
                       st.floats(0.0, 0.05)).map(
    lambda t: Thresholds(t[0], t[0] + t[1], min(1.0, t[0] + t[1] + t[2]), min(t[3], t[0] / 2)))


def rising(used: float, th: Thresholds) -> PressureLevel:
    return max((lv for lv in PressureLevel if used >= th.enter(lv)), default=PressureLevel.NORMAL)


def test_the_levels_by_example() -> None:
    assert next_level(PressureLevel.NORMAL, 0.50, T) is PressureLevel.NORMAL
    assert next_level(PressureLevel.NORMAL, 0.80, T) is PressureLevel.PRESSURE
    assert next_level(PressureLevel.NORMAL, 0.99, T) is PressureLevel.EMERGENCY  # jumps up
    # Down only past the hysteresis: CRITICAL (entered at 0.90) holds until < 0.85.
    assert next_level(PressureLevel.CRITICAL, 0.86, T) is PressureLevel.CRITICAL
    assert next_level(PressureLevel.CRITICAL, 0.84, T) is PressureLevel.PRESSURE
    assert next_level(PressureLevel.EMERGENCY, 0.10, T) is PressureLevel.NORMAL
    with pytest.raises(ValueError):
        Thresholds(pressure=0.9, critical=0.8)


@given(current=levels, used=fractions, th=thresholds)
def test_a_level_is_never_below_what_usage_demands_nor_above_what_it_justifies(
        current: PressureLevel, used: float, th: Thresholds) -> None:
    new = next_level(current, used, th)
    assert new >= rising(used, th)
    assert new <= max(current, rising(used, th))
    if new > current:
        assert used >= th.enter(new)
    if new < current:  # left only once usage is hysteresis below the threshold
        assert used < th.enter(current) - th.hysteresis
    assert next_level(new, used, th) is new  # settled: the same reading moves nothing


@given(th=thresholds, start=fractions,
       steps=st.lists(st.floats(-0.3, 0.3, allow_nan=False), max_size=40))
def test_opposite_moves_need_usage_to_travel_at_least_the_hysteresis(
        th: Thresholds, start: float, steps: list[float]) -> None:
    level = next_level(PressureLevel.NORMAL, start, th)
    last_move: tuple[int, float] | None = None  # (direction, usage at the move)
    used = start
    for step in steps:
        used = min(1.2, max(0.0, used + step))
        new = next_level(level, used, th)
        if new != level:
            direction = 1 if new > level else -1
            if last_move is not None and last_move[0] != direction:
                assert abs(used - last_move[1]) >= th.hysteresis - 1e-9
            last_move = (direction, used)
            level = new


class TrackerMachine(RuleBasedStateMachine):
    """Readings for two nodes' resources in any order: the tracker's levels are what
    the rule gives, changes are reported exactly when a level moves, and a node's
    level is its worst resource's."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = PressureTracker(T)
        self.model: dict[tuple[str, str], PressureLevel] = {}

    @rule(node=st.sampled_from(["n1", "n2"]), resource=st.sampled_from(["device:d0", PINNED]),
          used=st.integers(0, 110), capacity=st.sampled_from([0, 100]))
    def read(self, node: str, resource: str, used: int, capacity: int) -> None:
        before = self.model.get((node, resource), PressureLevel.NORMAL)
        reading = Reading(resource, used, capacity)
        expected = next_level(before, reading.fraction, T)
        changes = self.tracker.observe(node, [reading])
        if expected is before:
            assert changes == []
        else:
            assert [(c.previous, c.level) for c in changes] == [(before, expected)]
        self.model[(node, resource)] = expected

    @precondition(lambda self: bool(self.model))
    @rule(node=st.sampled_from(["n1", "n2"]))
    def forget(self, node: str) -> None:
        self.tracker.forget(node)
        self.model = {k: v for k, v in self.model.items() if k[0] != node}

    @invariant()
    def levels_match(self) -> None:
        for (node, resource), level in self.model.items():
            assert self.tracker.level(node, resource) is level
        for node in ("n1", "n2"):
            worst = max((lv for (n, _r), lv in self.model.items() if n == node),
                        default=PressureLevel.NORMAL)
            assert self.tracker.node_level(node) is worst


TestTrackerMachine = TrackerMachine.TestCase
TestTrackerMachine.settings = settings(max_examples=60, stateful_step_count=30,
                                       deadline=None)


# ---- graduated eviction -------------------------------------------------------------

async def two_idle(cluster: Cluster, name: str, scaledown_window: float,
                   min_instances: int = 0) -> list[str]:
    await cluster.deploy(name, gpu_memory=GiB, target_concurrency=1, max_concurrency=1,
                         scaledown_window=scaledown_window, min_instances=min_instances)
    grants = await asyncio.gather(*(cluster.control.acquire("dev", name, 30)
                                    for _ in range(2)))
    for grant in grants:
        await cluster.control.release(grant.lease_id, False, "")
    return [g.instance.id for g in grants]


async def test_pressure_evicts_idle_instances_past_half_their_window(
        cluster: Cluster) -> None:
    agent = await cluster.add_node("n1", [10 * GiB])
    await two_idle(cluster, "f", scaledown_window=100.0)
    await cluster.advance(40)
    await cluster.control.reconcile_once()
    assert agent.stopped == []  # NORMAL: 40 s < 100 s
    # Something else fills the device to 85 %: PRESSURE.
    await cluster.heartbeat("n1", used=[int(8.5 * GiB)])
    assert cluster.control.pressure.node_level("n1") is PressureLevel.PRESSURE
    await cluster.control.reconcile_once()
    assert agent.stopped == []  # 40 s < 50 s
    cluster.clock.advance(11)
    await cluster.heartbeat("n1", used=[int(8.5 * GiB)])
    await cluster.control.reconcile_once()
    assert sorted(r for _i, r in agent.stopped) == ["evicted under memory pressure"] * 2
    events = cluster.control.events.since(kinds=[EventKind.PRESSURE])
    assert [dict(e.attrs)["level"] for e in events] == ["pressure"]
    assert [e.kind for e in cluster.control.events.since(
        kinds=[EventKind.INSTANCE_EVICTED])] == [EventKind.INSTANCE_EVICTED] * 2


async def test_critical_evicts_every_idle_instance_above_min_and_idle_pinned_snapshots(
        cluster: Cluster) -> None:
    agent = await cluster.add_node("n1", [10 * GiB], pinned_capacity=100)
    await two_idle(cluster, "keep", min_instances=1, scaledown_window=3600.0)
    # Two functions with snapshots pinned on the node; only "hot" is used recently.
    store = cluster.control.store
    keys = {}
    for name in ("cold", "hot"):
        fn = await cluster.deploy(name)
        manifest = manifest_pb2.SnapshotManifest(function=f"dev/{name}", version="1")
        snap = await store.run(store.create_snapshot, fn.id, fn.version, "n1")
        await store.run(store.finish_snapshot, snap, SnapshotState.READY,
                        manifest=manifest.SerializeToString(), stored_bytes=10)
        await store.run(store.set_function_state, fn.id, fn.version, FunctionState.READY,
                        "", "fresh", snap)
        keys[name] = manifest_key(manifest)
    cluster.clock.advance(cluster.control.policy.pressure_pinned_idle + 1)
    grant = await cluster.control.acquire("dev", "hot", 30)
    await cluster.control.release(grant.lease_id, False, "")
    pinned = scheduler_pb2.PinnedTierInfo(capacity_bytes=100, used_bytes=50,
                                          snapshot_keys=list(keys.values()))
    await cluster.heartbeat("n1", used=[int(9.2 * GiB)], pinned=pinned)
    assert cluster.control.pressure.node_level("n1") is PressureLevel.CRITICAL
    await cluster.control.reconcile_once()
    stopped_keep = [i for i, r in agent.stopped if r == "evicted under memory pressure"]
    assert len(stopped_keep) == 1  # of two idle "keep" instances, min_instances=1 stays
    assert agent.evicted == ["dev/cold"]
    assert cluster.control.nodes["n1"].pinned.snapshot_keys == [keys["hot"]]
    assert [e.function for e in cluster.control.events.since(
        kinds=[EventKind.SNAPSHOT_EVICTED])] == ["dev/cold"]


async def test_emergency_refuses_cold_starts_on_that_node(cluster: Cluster) -> None:
    await cluster.add_node("n1", [10 * GiB])
    other = await cluster.add_node("n2", [10 * GiB])
    await cluster.heartbeat("n1", used=[int(9.8 * GiB)])
    assert cluster.control.pressure.node_level("n1") is PressureLevel.EMERGENCY
    info = SchedulerService(cluster.control)._node_info(cluster.control.nodes["n1"])
    assert info.pressure == "emergency"
    levels = {p.resource: (p.level, round(p.used_fraction, 2)) for p in info.pressures}
    assert levels == {"device:d0": ("emergency", 0.98), "pinned": ("normal", 0.0)}
    await cluster.deploy("f", gpu_memory=GiB, target_concurrency=1, max_concurrency=1)
    grants = await asyncio.gather(*(cluster.control.acquire("dev", "f", 30) for _ in range(3)))
    assert {g.instance.node_id for g in grants} == {"n2"}
    assert len(other.started) == 3
    # Back under the threshold less the hysteresis: it takes starts again.
    await cluster.heartbeat("n1", used=[int(9.0 * GiB)])
    assert cluster.control.pressure.node_level("n1") is PressureLevel.CRITICAL
    await cluster.heartbeat("n2", used=[10 * GiB])
    extra = await cluster.control.acquire("dev", "f", 30)
    assert extra.instance.node_id == "n1"
    info = [dict(e.attrs) for e in cluster.control.events.since(kinds=[EventKind.PRESSURE])
            if e.node_id == "n1"]
    assert [(i["previous"], i["level"]) for i in info] == [
        ("normal", "emergency"), ("emergency", "critical")]
