"""A hypothesis state machine over the control plane's instances: leases taken and
released (some failing), nodes cordoned, drained, lost and back, time passing with
reconcile passes, in any order. After every step the pools, leases and the nodes'
slice ledgers agree, and every instance is in a state its lifecycle allows."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.scheduler.conftest import Cluster, FakeAgent, FakeClock, GiB, make_control
from thaw.core.errors import ThawError
from thaw.scheduler.leasing import LeaseGrant
from thaw.scheduler.snapshots import drain
from thaw.scheduler.states import InstanceState, NodeState

NODES = ("n0", "n1")
FUNCTIONS = ("small", "big")


class InstanceLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="thaw-instance-machine-")
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.agents: dict[str, FakeAgent] = {}
        control = make_control(Path(self.folder), self.clock, self.agents,
                               acquire_wait=0.05)
        self.cluster = Cluster(control, self.clock, self.agents)
        self.leases: list[LeaseGrant] = []

    def run(self, coro: object) -> object:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    def teardown(self) -> None:
        self.run(self.cluster.control.close())
        self.cluster.control.store.close()
        self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @initialize()
    def nodes_and_functions(self) -> None:
        for node in NODES:
            self.run(self.cluster.add_node(node, [4 * GiB]))
        self.run(self.cluster.deploy("small", gpu_memory=GiB, max_instances=3,
                                     max_concurrency=2, scaledown_window=30))
        self.run(self.cluster.deploy("big", gpu_memory=3 * GiB, max_instances=2,
                                     max_concurrency=1, scaledown_window=60))

    @rule(name=st.sampled_from(FUNCTIONS))
    def acquire(self, name: str) -> None:
        # The fake clock stands still, so a request that has to wait would wait for
        # ever: it is cancelled after a moment instead (as a client going away).
        try:
            grant = self.run(asyncio.wait_for(
                self.cluster.control.acquire("dev", name, 0.05), 0.2))
        except (ThawError, TimeoutError):
            self.run(self.cluster.settle())
            return  # no room, no capacity, still waiting: no lease
        assert isinstance(grant, LeaseGrant)
        assert grant.instance.state is InstanceState.READY
        self.leases.append(grant)

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data(), failed=st.booleans())
    def release(self, data: st.DataObject, failed: bool) -> None:
        grant = self.leases.pop(data.draw(st.integers(0, len(self.leases) - 1)))
        self.run(self.cluster.control.release(grant.lease_id, failed, "broke"))
        self.run(self.cluster.settle())

    @rule(seconds=st.sampled_from([1.0, 20.0, 45.0, 90.0]))
    def time_passes(self, seconds: float) -> None:
        self.run(self.cluster.advance(seconds))
        self.run(self.cluster.control.reconcile_once())
        self.run(self.cluster.settle())

    @rule(node=st.sampled_from(NODES), cordoned=st.booleans())
    def cordon(self, node: str, cordoned: bool) -> None:
        self.run(self.cluster.control.cordon(node, cordoned))

    @rule(node=st.sampled_from(NODES))
    def drain(self, node: str) -> None:
        self.run(drain(self.cluster.control, node))
        self.run(self.cluster.settle())

    @rule(node=st.sampled_from(NODES), down=st.booleans())
    def agent_down_or_back(self, node: str, down: bool) -> None:
        self.cluster.agent(node).down = down
        if not down and self.cluster.control.nodes[node].state is NodeState.LOST:
            self.run(self.cluster.heartbeat(node))
            self.run(self.cluster.settle())

    @invariant()
    def pools_leases_and_ledgers_agree(self) -> None:
        control = self.cluster.control
        pooled = {i.id: i for p in control.pools.values() for i in p.instances.values()}
        for inst in pooled.values():
            # Never GONE (forgotten ones leave the pool), never STARTING (a view joins
            # its pool once started); a retired one is stopped once its calls end.
            assert inst.state in (InstanceState.READY, InstanceState.STOPPING)
            assert inst.inflight == sum(1 for g in self.leases if g.instance is inst)
        for grant in self.leases:
            assert grant.instance.id in pooled or grant.instance.state is InstanceState.GONE
        for node in control.nodes.values():
            for instance_id in node.slices:
                assert instance_id in pooled and pooled[instance_id].node_id == node.id
            if node.state is NodeState.LOST:
                assert not node.slices


InstanceLifecycle.TestCase.settings = settings(
    max_examples=10, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestInstanceLifecycle = InstanceLifecycle.TestCase
