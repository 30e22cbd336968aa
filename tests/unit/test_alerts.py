"""Alert rules and their state machine with fakes: the clock and every data source are
injected, so each test drives a condition across its threshold and back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from thaw.core.config import ALERT_RULES
from thaw.core.errors import InvalidArgument, Unavailable
from thaw.gateway.alert_sinks import AlertState, Notice
from thaw.gateway.alerts import (
    EVENTS_PAGE,
    RULES,
    AlertEngine,
    CallFigures,
    KeyExpiry,
    rules_from_settings,
)
from thaw.gateway.config import GatewaySettings
from thaw.proto import scheduler_pb2

DAY = 86400.0


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSources:
    """Every source the engine reads, set by the test; `down` makes one raise."""

    key_source = "fake"

    def __init__(self) -> None:
        self.node_list: list[scheduler_pb2.NodeInfo] = []
        self.depths: dict[str, int] = {}
        self.event_log: list[scheduler_pb2.Event] = []
        self.figures: dict[str, CallFigures] = {}
        self.keys: list[KeyExpiry] = []
        self.down: set[str] = set()
        self.event_reads: list[int] = []

    def _check(self, what: str) -> None:
        if what in self.down:
            raise Unavailable(f"{what} is down")

    async def nodes(self) -> Sequence[scheduler_pb2.NodeInfo]:
        self._check("nodes")
        return list(self.node_list)

    def queue_depths(self) -> Mapping[str, int]:
        self._check("queues")
        return dict(self.depths)

    async def events(self, after_seq: int, kinds: Sequence[str]
                     ) -> tuple[int, Sequence[scheduler_pb2.Event]]:
        self._check("events")
        self.event_reads.append(after_seq)
        last = self.event_log[-1].seq if self.event_log else 0
        found = [e for e in self.event_log if e.seq > after_seq and e.kind in kinds]
        return last, found[:EVENTS_PAGE]

    def calls(self, window: float, now: float) -> Mapping[str, CallFigures]:
        self._check("calls")
        return dict(self.figures)

    async def api_keys(self) -> Sequence[KeyExpiry]:
        self._check("keys")
        return list(self.keys)


def settings(**overrides: object) -> GatewaySettings:
    base: dict[str, object] = {"alerts_cooldown": 60.0, "alerts_min_requests": 10}
    return GatewaySettings.load(**{**base, **overrides})


class Harness:
    def __init__(self, **overrides: object) -> None:
        self.clock = Clock()
        self.sources = FakeSources()
        self.sent: list[Notice] = []
        self.engine = AlertEngine(rules_from_settings(settings(**overrides)), self.sources,
                                  self.sent.append, self.clock)

    async def tick(self, seconds: float = 15.0) -> list[Notice]:
        self.clock.advance(seconds)
        return await self.engine.evaluate()


def node(node_id: str = "n1", state: str = "ready", age: float = 1.0,
         pressures: Sequence[tuple[str, str, float]] = ()) -> scheduler_pb2.NodeInfo:
    return scheduler_pb2.NodeInfo(
        id=node_id, state=state, last_heartbeat_age_seconds=age,
        pressures=[scheduler_pb2.ResourcePressure(resource=r, level=lvl, used_fraction=f)
                   for r, lvl, f in pressures])


def states(notices: Sequence[Notice]) -> list[tuple[str, str, AlertState]]:
    return [(n.alert, n.subject, n.state) for n in notices]


def test_every_rule_has_a_check_and_a_setting_name() -> None:
    assert tuple(RULES) == ALERT_RULES
    assert {r.name for r in rules_from_settings(settings())} == set(ALERT_RULES)


def test_a_zero_threshold_or_enabled_false_turns_a_rule_off() -> None:
    names = {r.name for r in rules_from_settings(settings(
        alerts_queue_depth=0, alerts_error_rate=0,
        alerts_overrides={"p99_latency": {"enabled": False}, "node_down": {"for": 30}}))}
    assert "queue_depth" not in names and "error_rate" not in names
    assert "p99_latency" not in names and "node_down" in names
    node_rule = next(r for r in rules_from_settings(settings(
        alerts_overrides={"node_down": {"for": 30, "cooldown": 5}})) if r.name == "node_down")
    assert (node_rule.for_seconds, node_rule.cooldown) == (30, 5)


def test_unknown_rule_in_overrides_is_refused_naming_the_key() -> None:
    with pytest.raises(InvalidArgument) as err:
        settings(alerts_overrides={"queue_deep": {"for": 1}})
    assert err.value.field == "alerts_overrides"
    assert "queue_deep" in err.value.message


async def test_queue_depth_fires_once_then_resolves_once() -> None:
    h = Harness(alerts_queue_depth=5)
    h.sources.depths = {"t/f": 4}
    assert await h.tick() == []
    h.sources.depths = {"t/f": 5}
    fired = await h.tick()
    assert states(fired) == [("queue_depth", "t/f", AlertState.FIRING)]
    assert fired[0].value == 5 and fired[0].threshold == 5
    h.sources.depths = {"t/f": 9}
    assert await h.tick() == []  # still firing: no repeat
    h.sources.depths = {}
    resolved = await h.tick()
    assert states(resolved) == [("queue_depth", "t/f", AlertState.RESOLVED)]
    assert resolved[0].started_at == fired[0].started_at
    assert resolved[0].resolved_at == h.clock.now
    assert await h.tick() == []
    assert h.sent == fired + resolved


async def test_cooldown_holds_a_refire_and_flapping_is_announced_once() -> None:
    h = Harness(alerts_queue_depth=5)  # cooldown 60 s, a round every 15 s
    h.sources.depths = {"t/f": 6}
    assert len(await h.tick()) == 1            # t=15 FIRING
    h.sources.depths = {}
    assert states(await h.tick()) == [("queue_depth", "t/f", AlertState.RESOLVED)]  # t=30
    h.sources.depths = {"t/f": 6}
    assert await h.tick() == []                # t=45: back within the cooldown: held
    h.sources.depths = {}
    assert await h.tick() == []                # t=60: cleared while held: nothing
    h.sources.depths = {"t/f": 7}
    assert len(await h.tick()) == 1            # t=75: 60 s since the last FIRING
    assert h.engine.to_json()["active"][0]["state"] == "firing"
    assert [n.state for n in h.sent] == [AlertState.FIRING, AlertState.RESOLVED,
                                         AlertState.FIRING]
    assert h.engine.book.suppressed == 1


async def test_a_held_refire_is_announced_when_the_cooldown_ends_if_it_still_holds() -> None:
    h = Harness(alerts_queue_depth=5)
    h.sources.depths = {"t/f": 6}
    await h.tick(1)                            # FIRING at t=1
    h.sources.depths = {}
    await h.tick(1)                            # RESOLVED
    h.sources.depths = {"t/f": 6}
    assert await h.tick(1) == []               # held
    assert h.engine.to_json()["active"][0]["state"] == "suppressed"
    assert await h.tick(30) == []
    assert states(await h.tick(30)) == [("queue_depth", "t/f", AlertState.FIRING)]


async def test_for_duration_must_pass_before_firing() -> None:
    h = Harness(alerts_queue_depth=5, alerts_for=40)
    h.sources.depths = {"t/f": 6}
    assert await h.tick() == []                # seen at t=15 (pending)
    assert h.engine.to_json()["active"][0]["state"] == "pending"
    assert await h.tick() == []                # 15 s held
    assert await h.tick() == []                # 30 s held
    assert len(await h.tick()) == 1            # 45 s >= 40 s
    h2 = Harness(alerts_queue_depth=5, alerts_for=40)
    for depth in (6, 6, 0, 6, 6, 0):           # never held 40 s: never fires
        h2.sources.depths = {"t/f": depth}
        assert await h2.tick() == []
    assert h2.sent == []


async def test_device_and_pinned_pressure_per_node_and_resource() -> None:
    h = Harness(alerts_device_pressure="critical", alerts_pinned_pressure="pressure")
    h.sources.node_list = [node("n1", pressures=[("device:0", "pressure", 0.8),
                                                 ("device:1", "critical", 0.95),
                                                 ("pinned", "pressure", 0.85)]),
                           node("n2", pressures=[("device:0", "normal", 0.1),
                                                 ("pinned", "normal", 0.1)])]
    assert sorted(states(await h.tick())) == [
        ("device_pressure", "n1/device:1", AlertState.FIRING),
        ("pinned_pressure", "n1/pinned", AlertState.FIRING)]
    h.sources.node_list = [node("n1", pressures=[("device:1", "emergency", 0.99),
                                                 ("pinned", "normal", 0.2)])]
    assert states(await h.tick()) == [("pinned_pressure", "n1/pinned", AlertState.RESOLVED)]
    h.sources.node_list = [node("n1", pressures=[("device:1", "pressure", 0.8)])]
    assert states(await h.tick()) == [
        ("device_pressure", "n1/device:1", AlertState.RESOLVED)]


async def test_node_down_when_lost_or_silent_and_recovers() -> None:
    h = Harness(alerts_heartbeat_age=30)
    h.sources.node_list = [node("n1", age=2), node("n2", age=31), node("n3", state="lost",
                                                                       age=12)]
    assert sorted(states(await h.tick())) == [("node_down", "n2", AlertState.FIRING),
                                              ("node_down", "n3", AlertState.FIRING)]
    h.sources.node_list = [node("n1", age=2), node("n2", age=1), node("n3", state="lost")]
    assert states(await h.tick()) == [("node_down", "n2", AlertState.RESOLVED)]


async def test_an_unreachable_source_neither_fires_nor_resolves() -> None:
    h = Harness()
    h.sources.node_list = [node("n1", state="lost")]
    assert len(await h.tick()) == 1
    h.sources.down = {"nodes"}
    assert await h.tick() == []                # not "resolved": we cannot see
    assert h.engine.to_json()["active"][0]["alert"] == "node_down"
    h.sources.down = set()
    h.sources.node_list = [node("n1")]
    assert states(await h.tick()) == [("node_down", "n1", AlertState.RESOLVED)]


async def test_a_source_that_breaks_costs_only_its_own_rules() -> None:
    h = Harness(alerts_queue_depth=5)

    async def broken() -> Sequence[KeyExpiry]:
        raise RuntimeError("a bug")

    h.sources.api_keys = broken  # type: ignore[method-assign]
    h.sources.depths = {"t/f": 5}
    assert states(await h.tick()) == [("queue_depth", "t/f", AlertState.FIRING)]


async def test_error_rate_needs_min_requests_and_the_share() -> None:
    h = Harness(alerts_error_rate=0.5, alerts_min_requests=10)
    h.sources.figures = {"t/f": CallFigures(4, 4, 0.01)}    # too few to judge
    assert await h.tick() == []
    h.sources.figures = {"t/f": CallFigures(10, 4, 0.01)}   # 40 %
    assert await h.tick() == []
    h.sources.figures = {"t/f": CallFigures(10, 5, 0.01)}   # 50 %
    fired = await h.tick()
    assert states(fired) == [("error_rate", "t/f", AlertState.FIRING)]
    assert fired[0].value == 0.5 and "5 of 10" in fired[0].message
    h.sources.figures = {"t/f": CallFigures(20, 1, 0.01)}
    assert states(await h.tick()) == [("error_rate", "t/f", AlertState.RESOLVED)]


async def test_p99_latency_over_threshold() -> None:
    h = Harness(alerts_p99_seconds=2.0, alerts_min_requests=10)
    h.sources.figures = {"t/a": CallFigures(50, 0, 2.0), "t/b": CallFigures(50, 0, 2.5)}
    assert states(await h.tick()) == [("p99_latency", "t/b", AlertState.FIRING)]
    h.sources.figures = {"t/a": CallFigures(50, 0, 0.1)}     # b had no calls: clear
    assert states(await h.tick()) == [("p99_latency", "t/b", AlertState.RESOLVED)]


def event(seq: int, kind: str, function: str, time: float) -> scheduler_pb2.Event:
    return scheduler_pb2.Event(seq=seq, kind=kind, function=function, time=time,
                               message=f"{kind} #{seq}")


async def test_restore_failures_and_quarantines_count_within_the_window() -> None:
    h = Harness(alerts_restore_failures=2, alerts_quarantined=1, alerts_event_window=600)
    t0 = h.clock.now
    h.sources.event_log = [event(1, "restore_failed", "t/f", t0 + 1),
                           event(2, "node_lost", "", t0 + 2)]
    assert await h.tick() == []                # one failure < 2
    h.sources.event_log += [event(3, "restore_failed", "t/f", t0 + 20),
                            event(4, "snapshot_quarantined", "t/f", t0 + 20)]
    assert sorted(states(await h.tick())) == [
        ("restore_failures", "t/f", AlertState.FIRING),
        ("snapshot_quarantined", "t/f", AlertState.FIRING)]
    assert h.sources.event_reads[-1] == 1      # read on after the last seen seq
    assert await h.tick(500) == []             # t0+530: both failures still in window
    assert states(await h.tick(80)) == [     # t0+610: the first one has aged out
        ("restore_failures", "t/f", AlertState.RESOLVED)]
    assert states(await h.tick(20)) == [     # t0+630: the quarantine too
        ("snapshot_quarantined", "t/f", AlertState.RESOLVED)]


async def test_a_restarted_scheduler_numbers_events_afresh() -> None:
    h = Harness(alerts_quarantined=1)
    t0 = h.clock.now
    h.sources.event_log = [event(n, "node_lost", "", t0) for n in range(1, 8)]
    await h.tick()
    h.sources.event_log = [event(1, "snapshot_quarantined", "t/g", t0 + 20)]
    assert states(await h.tick()) == [("snapshot_quarantined", "t/g", AlertState.FIRING)]


async def test_api_keys_expiring_within_days() -> None:
    h = Harness(alerts_key_expiry_days=7)
    now = h.clock.now + 15
    h.sources.keys = [KeyExpiry("k1", "t", "ci", now + 3 * DAY),
                      KeyExpiry("k2", "t", "old", now + 30 * DAY),
                      KeyExpiry("k3", "u", "", now - DAY)]
    fired = await h.tick()
    assert sorted(states(fired)) == [("api_key_expiring", "k1", AlertState.FIRING),
                                     ("api_key_expiring", "k3", AlertState.FIRING)]
    assert any("has expired" in n.message for n in fired)
    h.sources.keys = h.sources.keys[:2]        # k3 revoked: no longer listed
    assert states(await h.tick()) == [("api_key_expiring", "k3", AlertState.RESOLVED)]


def test_live_call_figures_come_from_the_gateways_statistics_within_the_window() -> None:
    from thaw.gateway.alerts import LiveSources
    from thaw.gateway.stats import FunctionStats

    clock = Clock()
    stats = FunctionStats(clock=clock)
    for ms, status in ((5.0, 200), (3000.0, 500)):      # aged out of a 60 s window
        stats.record("t/f", "old", status, "warm", "", ms)
    clock.advance(100)
    for i in range(99):
        stats.record("t/f", f"r{i}", 200, "warm", "", 10.0)
    stats.record("t/f", "slow", 502, "none", "", 2500.0)
    sources = LiveSources(None, lambda: stats, 300.0)  # type: ignore[arg-type]
    figures = sources.calls(60.0, clock.now)
    assert figures == {"t/f": CallFigures(100, 1, 0.01)}
    assert sources.calls(600.0, clock.now)["t/f"].requests == 102
    assert LiveSources(None, lambda: None, 300.0).calls(60.0, clock.now) == {}  # type: ignore[arg-type]
