"""Fixtures for the scheduler's tests: a DB URL per backend (SQLite always,
PostgreSQL from THAW_TEST_POSTGRES_URL), and fakes injected through ControlPlane's
constructor (clock, agent clients) for unit tests of the control plane."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from thaw.core.errors import OutOfMemory, Unavailable
from thaw.core.spec import FunctionSpec, Resources, Scaling
from thaw.proto import agent_pb2, scheduler_pb2
from thaw.scheduler.bundles import BundleStore
from thaw.scheduler.control import ControlPlane
from thaw.scheduler.db import make_engine, upgrade
from thaw.scheduler.invocations import InvocationStore
from thaw.scheduler.policy import PolicyConfig
from thaw.scheduler.states import FunctionState
from thaw.scheduler.store import FunctionRecord, Store

POSTGRES_URL = os.environ.get("THAW_TEST_POSTGRES_URL", "")
GiB = 1024**3
SCHEDULER_FIXTURES = Path(__file__).parent / "fixtures"


# ---- databases ------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh schema in the PostgreSQL that
    THAW_TEST_POSTGRES_URL names (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'thaw.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("THAW_TEST_POSTGRES_URL is not set (CI sets it; see .ci/run)")
    schema = f"thaw_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(POSTGRES_URL).update_query_dict(
            {"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    engine = make_engine(db_url)
    upgrade(engine)
    s = Store(engine)
    try:
        yield s
    finally:
        s.close()
        engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000_000.0)


@pytest.fixture
def invocations(store: Store, clock: FakeClock) -> InvocationStore:
    """Stored invocations on each DB, on a clock the test moves."""
    return InvocationStore(store, clock)


# ---- fakes ------------------------------------------------------------------------------

class FakeClock:
    """The scheduler's monotonic clock, moved by the test."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeAgent:
    """An agent's control service in memory: allocates slices best-fit like
    platform/devices.py, records starts, stops and evictions."""

    address: str
    capacities: list[int] = field(default_factory=lambda: [8 * GiB])
    start_delay: float = 0.0
    down: bool = False
    """Calls fail as if the process were gone (and alive() says so)."""
    running: dict[str, tuple[int, int]] = field(default_factory=dict)
    """instance id -> (device index, bytes)"""
    started: list[str] = field(default_factory=list)
    stopped: list[tuple[str, str]] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    """Functions (tenant/name from the manifest) whose pinned copies were evicted."""

    def used(self) -> list[int]:
        used = [0] * len(self.capacities)
        for index, nbytes in self.running.values():
            used[index] += nbytes
        return used

    def devices(self) -> list[scheduler_pb2.DeviceInfo]:
        return [scheduler_pb2.DeviceInfo(id=f"d{i}", kind="host", capacity_bytes=cap,
                                         used_bytes=used)
                for i, (cap, used) in enumerate(zip(self.capacities, self.used(),
                                                    strict=True))]

    def _check(self) -> None:
        if self.down:
            raise Unavailable(f"peer unavailable: {self.address} refused the connection")

    async def start_instance(self, request: agent_pb2.StartInstanceRequest,
                             timeout: float) -> agent_pb2.StartInstanceResponse:
        self._check()
        need = request.function.gpu_memory_bytes
        free = [cap - used for cap, used in zip(self.capacities, self.used(), strict=True)]
        fitting = [i for i, f in enumerate(free) if f >= need]
        if not fitting:
            raise OutOfMemory(f"no device has {need} bytes free")
        index = min(fitting, key=lambda i: (free[i] - need, i))
        self.running[request.instance_id] = (index, need)
        if self.start_delay:
            await asyncio.sleep(self.start_delay)
        self._check()
        self.started.append(request.instance_id)
        return agent_pb2.StartInstanceResponse(
            instance_id=request.instance_id, kind=request.kind,
            timings=[agent_pb2.Timing(stage="restore", seconds=self.start_delay)])

    async def stop_instance(self, instance_id: str, reason: str, timeout: float = 30.0) -> None:
        self._check()
        self.running.pop(instance_id, None)
        self.stopped.append((instance_id, reason))

    async def evict(self, manifest: object, timeout: float = 60.0) -> agent_pb2.EvictResponse:
        self._check()
        self.evicted.append(manifest.function)  # type: ignore[attr-defined]
        return agent_pb2.EvictResponse(bytes=1024)

    async def collect_garbage(self, keep: list[object], timeout: float = 300.0
                              ) -> agent_pb2.CollectGarbageResponse:
        return agent_pb2.CollectGarbageResponse()

    async def alive(self, timeout: float = 2.0) -> bool:
        return not self.down

    async def close(self) -> None:
        pass


class Cluster:
    """A ControlPlane over a real SQLite store, with fake agents and a fake clock."""

    def __init__(self, control: ControlPlane, clock: FakeClock,
                 agents: dict[str, FakeAgent]) -> None:
        self.control = control
        self.clock = clock
        self.agents = agents
        self.db_url: str | None = None
        """The DB the control plane uses, when not the default SQLite file."""

    def agent(self, node_id: str) -> FakeAgent:
        return self.agents[f"{node_id}:1"]

    async def add_node(self, node_id: str, capacities: list[int] | None = None,
                       start_delay: float = 0.0, pinned_capacity: int = 0) -> FakeAgent:
        agent = FakeAgent(f"{node_id}:1", capacities or [8 * GiB], start_delay)
        self.agents[agent.address] = agent
        await self.control.register(scheduler_pb2.RegisterRequest(
            node_id=node_id, control_address=agent.address, data_url=f"http://{node_id}",
            devices=agent.devices()))
        if pinned_capacity:
            await self.heartbeat(node_id, pinned=scheduler_pb2.PinnedTierInfo(
                capacity_bytes=pinned_capacity))
        return agent

    async def heartbeat(self, node_id: str, *, used: list[int] | None = None,
                        pinned: scheduler_pb2.PinnedTierInfo | None = None) -> bool:
        """Report the fake agent's state (or the given device usage) now."""
        agent = self.agent(node_id)
        devices = agent.devices()
        if used is not None:
            for device, nbytes in zip(devices, used, strict=True):
                device.used_bytes = nbytes
        node = self.control.nodes[node_id]
        return await self.control.heartbeat(scheduler_pb2.HeartbeatRequest(
            node_id=node_id, devices=devices, instance_ids=list(agent.running),
            pinned=pinned if pinned is not None else node.pinned))

    async def deploy(self, name: str, *, gpu_memory: int = 0, tenant: str = "dev",
                     **scaling: float) -> FunctionRecord:
        spec = FunctionSpec(name=name, handler="app:Handler",
                            resources=Resources(gpu_memory=gpu_memory),
                            scaling=Scaling(**scaling))  # type: ignore[arg-type]
        store = self.control.store
        return await store.run(store.upsert_function, tenant, spec, "0" * 64, "fresh",
                               FunctionState.READY)

    async def advance(self, seconds: float) -> None:
        """Move the clock; nodes whose agent is up heartbeat at the new time."""
        self.clock.advance(seconds)
        for node_id, node in self.control.nodes.items():
            if not self.agents[node.control_address].down:
                await self.heartbeat(node_id)

    async def settle(self) -> None:
        """Let background tasks (min_instances starts, stops) finish."""
        for _ in range(100):
            pending = [t for t in self.control._background if not t.done()]
            if not pending:
                return
            await asyncio.wait(pending, timeout=5)


def make_control(tmp_path: Path, clock: FakeClock, agents: dict[str, FakeAgent],
                 policy: PolicyConfig | None = None, db: str | None = None,
                 **kwargs: float) -> ControlPlane:
    engine = make_engine(db or f"sqlite:///{tmp_path / 'thaw.db'}")
    upgrade(engine)
    settings: dict[str, float] = {"heartbeat_interval": 1.0, "node_timeout": 5.0,
                                  "build_timeout": 60.0, "acquire_wait": 30.0}
    settings.update(kwargs)
    return ControlPlane(Store(engine), BundleStore(tmp_path / "bundles"),
                        policy=policy or PolicyConfig(), clock=clock,
                        agent_client=lambda address: agents[address],  # type: ignore
                        **settings)


@pytest.fixture
def policy() -> PolicyConfig:
    return PolicyConfig()


@pytest.fixture
async def cluster(tmp_path: Path, policy: PolicyConfig) -> AsyncIterator[Cluster]:
    """A control plane on SQLite with no nodes yet."""
    clock = FakeClock()
    agents: dict[str, FakeAgent] = {}
    control = make_control(tmp_path, clock, agents, policy)
    try:
        yield Cluster(control, clock, agents)
    finally:
        await control.close()
        control.store.close()


@pytest.fixture
async def db_cluster(tmp_path: Path, db_url: str) -> AsyncIterator[Cluster]:
    """The same on each DB backend (db_url): for tests of what survives a restart."""
    clock = FakeClock()
    agents: dict[str, FakeAgent] = {}
    control = make_control(tmp_path, clock, agents, db=db_url)
    cluster = Cluster(control, clock, agents)
    cluster.db_url = db_url
    try:
        yield cluster
    finally:
        await cluster.control.close()
        cluster.control.store.close()
