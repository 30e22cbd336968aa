"""Property-based state machines for the lifecycles kept in the metadata DB: function
versions (scheduler/versions.py) and stored invocations (scheduler/invocations.py).

Each machine drives the real store code on a fresh SQLite file migrated to head
(scheduler/db.py `upgrade`), keeps a small model of what the store should hold, and
after every step reads the DB back and checks the model and the invariants that must
hold whatever the order of events (tests/unit/test_states.py checks the transition
tables alone). `pytest --hypothesis-show-statistics` shows which paths a run reached
(the `event` calls: superseded builds, rebuilding rollbacks, lapsed claims, sweeps)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from thaw.core.errors import NotFound
from thaw.core.spec import FunctionSpec
from thaw.proto import invocations_pb2, manifest_pb2
from thaw.scheduler import models
from thaw.scheduler.db import make_engine, upgrade
from thaw.scheduler.invocations import (
    FINISHED,
    TOMBSTONE_SECONDS,
    Completion,
    InvocationState,
    InvocationStore,
    to_proto,
)
from thaw.scheduler.states import FunctionState, IllegalTransition, SnapshotState
from thaw.scheduler.store import Store
from thaw.scheduler.versions import RETAINED_VERSIONS, VersionState, VersionStore

# Bounded so that the whole file runs in a few seconds on the small CI machine; the
# rules are few, so short runs still reach the interesting interleavings.
MACHINE_SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])


_TEMPLATE: list[str] = []


def _migrated_template() -> str:
    """One SQLite file migrated to head by the scheduler's own upgrade; each run
    starts from a copy (migrating each time would be most of the run time)."""
    if not _TEMPLATE:
        folder = tempfile.mkdtemp(prefix="thaw-lifecycle-template-")
        engine = make_engine(f"sqlite:///{folder}/thaw.db")
        upgrade(engine)
        engine.dispose()  # the last connection's close checkpoints the WAL into the file
        _TEMPLATE.append(f"{folder}/thaw.db")
    return _TEMPLATE[0]


class _DBMachine(RuleBasedStateMachine):
    """A fresh migrated SQLite file per run."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="thaw-lifecycle-")
        shutil.copyfile(_migrated_template(), f"{self.folder}/thaw.db")
        self.engine = make_engine(f"sqlite:///{self.folder}/thaw.db")
        self.store = Store(self.engine)

    def teardown(self) -> None:
        self.store.close()
        self.engine.dispose()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _remove_template() -> Iterator[None]:
    yield
    if _TEMPLATE:
        shutil.rmtree(Path(_TEMPLATE.pop()).parent, ignore_errors=True)


# ---- function versions --------------------------------------------------------------

TENANT = "t"
FUNCTIONS = ("alpha", "beta")


@dataclass
class VersionModel:
    state: VersionState
    start_mode: str
    snapshot: str = ""
    """"" (none linked) | ready | quarantined"""
    snapshot_id: str | None = None
    collected: bool = False


@dataclass
class FunctionModel:
    id: str
    version: int
    state: FunctionState
    snapshot_of: int | None = None
    """The version whose snapshot the functions row names (fn.snapshot_id)."""
    versions: dict[int, VersionModel] = field(default_factory=dict)
    builds: list[int] = field(default_factory=list)
    """Versions whose build task is still running (a superseded one keeps running)."""
    failed: set[int] = field(default_factory=set)
    """Versions seen FAILED: that state is final."""


class VersionLifecycle(_DBMachine):
    """Deploys (with and without a snapshot build), builds that succeed, fail, cannot
    capture or finish after being superseded, rollbacks (instant or rebuilding a
    collected snapshot), quarantines, garbage collection and deletes, in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.versions = VersionStore(self.store)
        self.functions: dict[str, FunctionModel] = {}
        self.manifests = 0

    def _spec(self, name: str) -> FunctionSpec:
        return FunctionSpec(name=name, handler="app:Handler")

    @staticmethod
    def _supersede(model: FunctionModel) -> None:
        for number, v in model.versions.items():
            if v.state is VersionState.BUILDING:
                v.state = VersionState.FAILED
                model.failed.add(number)

    def _activate(self, model: FunctionModel, number: int) -> None:
        v = model.versions[number]
        model.version, model.state = number, FunctionState.READY
        model.snapshot_of = number if v.start_mode == "restore" else None

    def _not_deleted(self) -> list[str]:
        """Functions one may roll back or delete; redeploying brings a deleted one
        back, so that there always is one."""
        names = sorted(n for n, m in self.functions.items()
                       if m.state is not FunctionState.DELETED)
        if not names:
            self.deploy(FUNCTIONS[0], False)
            names = [FUNCTIONS[0]]
        return names

    # Rules that do not apply in some states return instead of using preconditions: a
    # disabled rule drawn three times in a row makes hypothesis discard the run.

    @initialize()
    def serving(self) -> None:
        """Start from a function that serves a built version: short runs then reach
        redeploys, rollbacks and collection sooner."""
        self.deploy(FUNCTIONS[0], True)
        self._finish(FUNCTIONS[0], 0, "ok")

    @rule(name=st.sampled_from(FUNCTIONS), snapshots=st.booleans())
    def deploy(self, name: str, snapshots: bool) -> None:
        if snapshots:
            fn, ver = self.versions.deploy(TENANT, self._spec(name), "d" * 64, "restore", True)
        else:
            fn, ver = self.versions.deploy(TENANT, self._spec(name), "d" * 64, "fresh",
                                           False, "snapshots disabled")
        model = self.functions.get(name)
        if model is None:
            model = self.functions[name] = FunctionModel(fn.id, 0, FunctionState.BUILDING)
        number = max([model.version, *model.versions]) + 1
        assert ver.version == number and fn.id == model.id
        self._supersede(model)
        serving = model.state is FunctionState.READY
        model.versions[number] = VersionModel(
            VersionState.BUILDING if snapshots else VersionState.READY,
            "restore" if snapshots else "fresh")
        if snapshots:
            model.builds.append(number)
            if not serving:
                model.version, model.state = number, FunctionState.BUILDING
                model.snapshot_of = None
        else:
            self._activate(model, number)

    @rule(data=st.data(), outcome=st.sampled_from(["ok", "fail", "capture"]))
    def finish_build(self, data: st.DataObject, outcome: str) -> None:
        """What ControlPlane._build does with the agent's answer."""
        building = sorted(n for n, m in self.functions.items() if m.builds)
        if not building:
            return
        name = data.draw(st.sampled_from(building))
        index = data.draw(st.integers(0, len(self.functions[name].builds) - 1))
        self._finish(name, index, outcome)

    def _finish(self, name: str, index: int, outcome: str) -> None:
        model = self.functions[name]
        number = model.builds.pop(index)
        v = model.versions[number]
        snapshot_id = self.store.create_snapshot(model.id, number, "n1")
        activates = (v.state is VersionState.BUILDING
                     and model.state is not FunctionState.DELETED)
        if outcome == "fail":
            self.store.finish_snapshot(snapshot_id, SnapshotState.FAILED, reason="boom")
            fn = self.versions.fail(model.id, number, "setup failed: boom")
            assert fn is not None
            if v.state is VersionState.BUILDING:
                v.state = VersionState.FAILED
                model.failed.add(number)
                if model.version == number and model.state is FunctionState.BUILDING:
                    model.state = FunctionState.FAILED
            return
        if outcome == "ok":
            self.manifests += 1
            manifest = manifest_pb2.SnapshotManifest(function=f"{TENANT}/{name}",
                                                     version=str(self.manifests))
            self.store.finish_snapshot(snapshot_id, SnapshotState.READY,
                                       manifest=manifest.SerializeToString(),
                                       stored_bytes=1000)
            fn = self.versions.activate(model.id, number, start_mode="restore",
                                        snapshot_id=snapshot_id)
        else:
            self.store.finish_snapshot(snapshot_id, SnapshotState.FAILED, reason="capture")
            fn = self.versions.activate(model.id, number, start_mode="fresh",
                                        reason="cannot capture")
        # A superseded build (or one of a deleted function) never switches.
        assert (fn is not None) == activates
        event(f"build {outcome}, activated={activates}")
        if activates:
            v.state = VersionState.READY
            v.start_mode = "restore" if outcome == "ok" else "fresh"
            if outcome == "ok":
                v.snapshot, v.snapshot_id, v.collected = "ready", snapshot_id, False
            self._activate(model, number)

    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        """The decision ControlPlane.rollback makes, from what the store reports."""
        name = data.draw(st.sampled_from(self._not_deleted()))
        model = self.functions[name]
        number = data.draw(st.sampled_from(sorted(model.versions)))
        target = self.versions.get(model.id, number)
        if target.state is not VersionState.READY:
            # The control plane refuses; the store refuses too if asked directly, and
            # nothing changes (the transaction rolls back).
            with pytest.raises(IllegalTransition):
                self.versions.activate(model.id, number, start_mode=target.start_mode,
                                       after_build=False)
            return
        if number == model.version and model.state is FunctionState.READY:
            return
        self._supersede(model)
        if target.restorable:
            fn = self.versions.activate(model.id, number, start_mode=target.start_mode,
                                        reason=target.reason, after_build=False)
            assert fn is not None and fn.version == number
            self._activate(model, number)
        else:
            event("rollback rebuilds a collected snapshot")
            rebuilding = self.versions.begin_rebuild(model.id, number)
            assert rebuilding.state is VersionState.BUILDING
            v = model.versions[number]
            v.state, v.snapshot, v.snapshot_id, v.collected = (
                VersionState.BUILDING, "", None, False)
            model.builds.append(number)

    @rule(data=st.data())
    def quarantine(self, data: st.DataObject) -> None:
        """What ControlPlane._quarantine does after a failed restore."""
        restoring = sorted(n for n, m in self.functions.items()
                           if m.state is FunctionState.READY and m.snapshot_of
                           and m.versions[m.version].start_mode == "restore")
        if not restoring:
            return
        name = data.draw(st.sampled_from(restoring))
        model = self.functions[name]
        v = model.versions[model.version]
        assert v.snapshot_id is not None
        self.store.finish_snapshot(v.snapshot_id, SnapshotState.QUARANTINED, reason="bad")
        assert self.store.set_function_state(model.id, model.version, FunctionState.READY,
                                             "quarantined", "fresh") is not None
        self.versions.run_fresh(model.id, model.version, "quarantined")
        v.snapshot, v.start_mode = "quarantined", "fresh"

    @rule(keep=st.sampled_from([0, 1, RETAINED_VERSIONS]))
    def collect_garbage(self, keep: int) -> None:
        # A small `keep` too, so that short runs collect snapshots and roll back to
        # collected versions.
        self.versions.retained_manifests(keep)
        for model in self.functions.values():
            deleted = model.state is FunctionState.DELETED
            others = 0
            for number in sorted(model.versions, reverse=True):
                v = model.versions[number]
                if v.state is not VersionState.READY or v.snapshot_id is None or v.collected:
                    continue
                active = model.snapshot_of == number and not deleted
                if not active and not deleted:
                    others += 1
                    retained = others <= keep
                else:
                    retained = active
                v.collected = not retained

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._not_deleted()))
        model = self.functions[name]
        assert self.store.set_function_state(model.id, model.version, FunctionState.DELETED,
                                             "deleted") is not None
        model.state = FunctionState.DELETED

    # -- invariants --

    @invariant()
    def the_db_matches_the_model_and_the_invariants_hold(self) -> None:
        for name, model in self.functions.items():
            fn = self.store.get_function(TENANT, name, include_deleted=True)
            rows = {v.version: v for v in self.versions.all(model.id)}
            assert (fn.version, fn.state) == (model.version, model.state)
            assert set(rows) == set(model.versions)
            for number, expected in model.versions.items():
                row = rows[number]
                assert row.state is expected.state, (number, row.reason)
                assert row.start_mode == expected.start_mode
                assert row.snapshot_id == expected.snapshot_id
                if expected.collected:
                    assert row.snapshot_state == "collected"
                elif expected.snapshot:
                    assert row.snapshot_state == expected.snapshot
            # Exactly one version is the function's; when it serves, it is ready
            # and describes the functions row.
            assert fn.version in rows
            active = rows[fn.version]
            if fn.state is FunctionState.READY:
                assert active.state is VersionState.READY
                assert (fn.start_mode, fn.handler, fn.bundle_digest) == (
                    active.start_mode, active.handler, active.bundle_digest)
                if fn.start_mode == "restore":
                    # Serving from a snapshot: one that exists and was not collected.
                    assert fn.snapshot_id is not None and fn.snapshot_id == active.snapshot_id
                    assert active.snapshot_state == "ready"
                    assert self.store.get_snapshot(fn.snapshot_id).state is SnapshotState.READY
            # A failed build never becomes ready, let alone active.
            for number in model.failed:
                assert rows[number].state is VersionState.FAILED
            # At most one build heads for activation.
            assert sum(1 for r in rows.values() if r.state is VersionState.BUILDING) <= 1


# ---- stored invocations -----------------------------------------------------------

TTL = 100.0
CLAIM = 30.0
TENANTS = ("t1", "t2")
GATEWAYS = ("gw-a", "gw-b")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class InvocationModel:
    id: str
    tenant: str
    key: str
    priority: int
    created_at: float
    state: InvocationState
    claimed_by: str = ""
    claim_until: float | None = None
    expires_at: float | None = None
    result: bytes = b""
    deleted: bool = False
    final: InvocationState | None = None
    """The first terminal state the DB reported for it."""

    def effective(self, now: float) -> InvocationState:
        if (self.state in FINISHED and self.expires_at is not None
                and self.expires_at <= now):
            return InvocationState.EXPIRED
        return self.state


class InvocationLifecycle(_DBMachine):
    """Creates (with and without an idempotency key, claimed at once or queued), claims
    by two gateway replicas, renewals, releases, completions, cancels, time passing
    (claims lapse, results expire) and sweeps, in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.invocations = InvocationStore(self.store, self.clock)
        self.model: dict[str, InvocationModel] = {}
        self.results = 0

    def _live(self) -> list[InvocationModel]:
        return [m for m in self.model.values() if not m.deleted]

    def _pick(self) -> list[InvocationModel]:
        """Invocations a rule may act on (after a sweep deleted them all, a new one)."""
        if not self._live():
            self.create("t1", "", 50, "")
        return sorted(self._live(), key=lambda m: m.created_at)  # replayable: ids are random

    def _eligible(self) -> list[InvocationModel]:
        now = self.clock.now
        return [m for m in self._live()
                if m.state is InvocationState.QUEUED
                or (m.state is InvocationState.RUNNING and m.claim_until is not None
                    and m.claim_until < now)]

    # -- rules --

    @initialize()
    def some_claimed(self) -> None:
        """Start with work queued and running, so short runs reach lapses and races."""
        self.create("t1", "k1", 50, "gw-a")
        self.create("t1", "", 90, "")
        self.create("t2", "k1", 10, "")

    @rule(tenant=st.sampled_from(TENANTS), key=st.sampled_from(["", "k1", "k2"]),
          priority=st.sampled_from([10, 50, 90]),
          claimed_by=st.sampled_from(["", *GATEWAYS]))
    def create(self, tenant: str, key: str, priority: int, claimed_by: str) -> None:
        # Distinct creation times, so that the claim order is fully determined.
        self.clock.now += 0.001
        now = self.clock.now
        holder = [m for m in self._live() if key and m.tenant == tenant and m.key == key
                  and m.effective(now) is not InvocationState.EXPIRED]
        inv, created = self.invocations.create(invocations_pb2.Invocation(
            tenant=tenant, function="fn", priority=priority, body=b"request",
            idempotency_key=key, request_digest="d"), claimed_by, CLAIM)
        if holder:
            # One key, one invocation per tenant: the live one is answered.
            assert not created and inv.id == holder[0].id
            return
        assert created and inv.id not in self.model
        for m in self._live():
            if key and m.tenant == tenant and m.key == key:
                # Its TTL passed: expired on the spot, and the key is free for this one.
                m.state, m.key = InvocationState.EXPIRED, ""
        self.model[inv.id] = InvocationModel(
            inv.id, tenant, key, priority, now,
            InvocationState.RUNNING if claimed_by else InvocationState.QUEUED,
            claimed_by, now + CLAIM if claimed_by else None)

    @rule(gateway=st.sampled_from(GATEWAYS), limit=st.integers(1, 3))
    def claim(self, gateway: str, limit: int) -> None:
        eligible = sorted(self._eligible(), key=lambda m: (-m.priority, m.created_at))
        claimed = self.invocations.claim(gateway, limit, CLAIM)
        assert [c.id for c in claimed] == [m.id for m in eligible[:limit]]
        lapsed = any(m.state is InvocationState.RUNNING for m in eligible[:limit])
        event(f"claim takes over a lapsed claim={lapsed}")
        for c in claimed:
            m = self.model[c.id]
            assert c.state == "running" and c.body == b"request"
            m.state, m.claimed_by, m.claim_until = (
                InvocationState.RUNNING, gateway, self.clock.now + CLAIM)

    @rule(gateway=st.sampled_from(GATEWAYS), data=st.data())
    def renew(self, gateway: str, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.model)), max_size=3,
                                 unique=True))
        stop = self.invocations.renew(gateway, ids, CLAIM)
        keep = [i for i in ids if not self.model[i].deleted
                and self.model[i].state is InvocationState.RUNNING
                and self.model[i].claimed_by == gateway]
        assert sorted(stop) == sorted(set(ids) - set(keep))
        for i in keep:
            self.model[i].claim_until = self.clock.now + CLAIM

    @rule(gateway=st.sampled_from(GATEWAYS), data=st.data())
    def release(self, gateway: str, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.model)), max_size=3,
                                 unique=True))
        self.invocations.release(gateway, ids)
        for i in ids:
            m = self.model[i]
            if (not m.deleted and m.state is InvocationState.RUNNING
                    and m.claimed_by == gateway):
                m.state, m.claimed_by, m.claim_until = InvocationState.QUEUED, "", None

    @rule(gateway=st.sampled_from(GATEWAYS), data=st.data(), succeeded=st.booleans())
    def complete(self, gateway: str, data: st.DataObject, succeeded: bool) -> None:
        m = data.draw(st.sampled_from(self._pick()))
        self.results += 1
        body = f"result-{self.results}".encode()
        state = InvocationState.SUCCEEDED if succeeded else InvocationState.FAILED
        got = self.invocations.complete(
            m.id, gateway, Completion(state, 200 if succeeded else 500, "text/plain", body),
            TTL)
        if m.state is InvocationState.RUNNING:
            m.state, m.result = state, body
            m.claim_until, m.expires_at = None, self.clock.now + TTL
        # Anything already finished keeps what it has.
        assert got.state == m.effective(self.clock.now).value

    @rule(tenant=st.sampled_from(TENANTS), data=st.data())
    def cancel(self, tenant: str, data: st.DataObject) -> None:
        m = data.draw(st.sampled_from(self._pick()))
        if tenant != m.tenant:
            # Another tenant's invocation does not exist for this one.
            with pytest.raises(NotFound):
                self.invocations.cancel(tenant, m.id, TTL)
            return
        got = self.invocations.cancel(tenant, m.id, TTL)
        if m.effective(self.clock.now) not in FINISHED:
            m.state, m.claim_until = InvocationState.CANCELLED, None
            m.expires_at = self.clock.now + TTL
        assert got.state == m.effective(self.clock.now).value

    # Steps just past each bound: a claim lapses, a result expires, a tombstone goes.
    @rule(seconds=st.sampled_from([1.0, CLAIM + 1, TTL + 1, TOMBSTONE_SECONDS + TTL]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def sweep(self) -> None:
        now = self.clock.now
        expiring = [m for m in self._live() if m.state in FINISHED
                    and m.state is not InvocationState.EXPIRED
                    and m.expires_at is not None and m.expires_at <= now]
        gone = [m for m in self._live() if m.effective(now) is InvocationState.EXPIRED
                and m.expires_at is not None and m.expires_at <= now - TOMBSTONE_SECONDS]
        expired, deleted = self.invocations.sweep()
        event(f"sweep expired={expired > 0} deleted={deleted > 0}")
        assert (expired, deleted) == (len(expiring), len(gone))
        for m in expiring:
            m.state, m.key = InvocationState.EXPIRED, ""
        for m in gone:
            m.deleted = True

    # -- invariants --

    @invariant()
    def the_db_matches_the_model_and_the_invariants_hold(self) -> None:
        now = self.clock.now

        def read(s: Session) -> dict[str, tuple[str, invocations_pb2.Invocation]]:
            # The row's own state, and what a GET with bodies answers (to_proto is
            # what `get` returns; one transaction keeps the check cheap).
            return {r.id: (r.state, to_proto(r, True, now))
                    for r in s.scalars(select(models.Invocation))}
        stored = self.store._tx(read)
        assert set(stored) == {m.id for m in self._live()}
        newest = max(self._live(), key=lambda m: m.created_at, default=None)
        if newest is not None:
            # Through the API too: its tenant sees it, the other one does not.
            assert self.invocations.get(newest.tenant, newest.id, True) == stored[newest.id][1]
            other = next(t for t in TENANTS if t != newest.tenant)
            with pytest.raises(NotFound):
                self.invocations.get(other, newest.id, True)
        live_keys: set[tuple[str, str]] = set()
        for m in self._live():
            state, got = stored[m.id]
            claimed_by, claim_until = got.claimed_by, got.claim_until or None
            key = got.idempotency_key or None
            assert state == m.state.value
            effective = m.effective(now)
            assert got.state == effective.value
            if m.state is InvocationState.RUNNING:
                # One claimant, with a lease.
                assert claimed_by == m.claimed_by and claimed_by in GATEWAYS
                assert claim_until == m.claim_until
            elif m.state is InvocationState.QUEUED:
                assert claimed_by == "" and claim_until is None
            if effective is InvocationState.EXPIRED:
                # Past its TTL nothing is readable, whether or not a sweep ran.
                assert got.result_body == b"" and got.body == b""
            elif effective in FINISHED:
                # Terminal: the result first stored stays (a late completion or
                # cancel does not overwrite it).
                assert got.result_body == m.result
            # Terminal states never change (but to expired, once the TTL passed).
            if m.final is None and effective in FINISHED:
                m.final = effective
            elif m.final is not None:
                assert effective in (m.final, InvocationState.EXPIRED)
                if m.final is InvocationState.EXPIRED:
                    assert effective is InvocationState.EXPIRED
            # One live invocation per (tenant, key); an expired one holds no key once
            # it is marked so.
            assert key == (m.key or None)
            if key is not None and effective is not InvocationState.EXPIRED:
                assert (m.tenant, key) not in live_keys
                live_keys.add((m.tenant, key))


TestVersionLifecycle = VersionLifecycle.TestCase
TestVersionLifecycle.settings = MACHINE_SETTINGS
TestInvocationLifecycle = InvocationLifecycle.TestCase
TestInvocationLifecycle.settings = MACHINE_SETTINGS
