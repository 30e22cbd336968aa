"""The alert events of a failed restore (scheduler/starts.py `_restore_failed`,
`_quarantine`): `restore_failed` for each restore that fails and starts fresh, naming
the function and the node; `snapshot_quarantined` once a restore fails because the
snapshot itself is broken (its bytes, or the same failure on two nodes: see
test_restore_faults.py). Unreachable chunks are not the snapshot's fault: it is kept."""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.scheduler.conftest import Cluster, FakeAgent
from thaw.core.errors import ChunkNotFound, CorruptChunk, SnapshotError
from thaw.core.spec import FunctionSpec, Scaling
from thaw.proto import agent_pb2, manifest_pb2, scheduler_pb2
from thaw.scheduler.events import EventKind
from thaw.scheduler.states import FunctionState, SnapshotState
from thaw.scheduler.store import FunctionRecord

NAME = "restorable"


@dataclass
class FailingRestoreAgent(FakeAgent):
    """Restores fail with the next error of `restore_errors` (and succeed once there
    is none left); fresh starts work."""

    restore_errors: list[Exception] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    """The kind of every start asked for, in order."""

    async def start_instance(self, request: agent_pb2.StartInstanceRequest,
                             timeout: float) -> agent_pb2.StartInstanceResponse:
        self.kinds.append(request.kind)
        if request.kind == agent_pb2.START_RESTORE and self.restore_errors:
            raise self.restore_errors.pop(0)
        return await super().start_instance(request, timeout)


async def add_failing_node(cluster: Cluster, node_id: str) -> FailingRestoreAgent:
    agent = FailingRestoreAgent(f"{node_id}:1")
    cluster.agents[agent.address] = agent
    await cluster.control.register(scheduler_pb2.RegisterRequest(
        node_id=node_id, control_address=agent.address, data_url=f"http://{node_id}",
        devices=agent.devices()))
    return agent


async def deploy_with_snapshot(cluster: Cluster, node_id: str) -> FunctionRecord:
    """A function serving from a ready snapshot held by `node_id` (as a finished build
    leaves it); one call per instance, so each acquire below starts one."""
    store = cluster.control.store
    spec = FunctionSpec(name=NAME, handler="app:Handler",
                        scaling=Scaling(max_concurrency=1, target_concurrency=1,
                                        max_instances=10))
    fn = await store.run(store.upsert_function, "dev", spec, "0" * 64, "restore",
                         FunctionState.READY)
    snapshot_id = await store.run(store.create_snapshot, fn.id, fn.version, node_id)
    manifest = manifest_pb2.SnapshotManifest(function=f"dev/{NAME}", version=str(fn.version))
    await store.run(store.finish_snapshot, snapshot_id, SnapshotState.READY,
                    manifest=manifest.SerializeToString(), stored_bytes=1000)
    updated = await store.run(store.set_function_state, fn.id, fn.version,
                              FunctionState.READY, "", "restore", snapshot_id)
    assert updated is not None and updated.snapshot_id == snapshot_id
    return updated


def attrs(event: object) -> dict[str, str]:
    return dict(event.attrs)  # type: ignore[attr-defined]


async def test_restore_failures_then_quarantine_emit_their_events(cluster: Cluster) -> None:
    agent = await add_failing_node(cluster, "n1")
    fn = await deploy_with_snapshot(cluster, "n1")
    agent.restore_errors = [ChunkNotFound("chunk c1 is in no tier"),
                            ChunkNotFound("chunk c1 is in no tier"),
                            CorruptChunk("the restored heap does not match its digest")]
    events = cluster.control.events
    store = cluster.control.store

    # Twice the chunks are out of reach: each start falls back to a fresh one and
    # says so, but the snapshot is not to blame and stays in use.
    for attempt in (1, 2):
        grant = await cluster.control.acquire("dev", NAME, 30)
        assert grant.start == "fresh"
        failed = events.since(kinds=[EventKind.RESTORE_FAILED])
        assert len(failed) == attempt
        assert (failed[-1].function, failed[-1].node_id) == (f"dev/{NAME}", "n1")
        assert attrs(failed[-1]) == {"quarantined": "False", "snapshot": fn.snapshot_id}
        assert events.since(kinds=[EventKind.SNAPSHOT_QUARANTINED]) == []
        assert (await store.run(store.get_snapshot, fn.snapshot_id)).state is \
            SnapshotState.READY

    # Then the snapshot itself fails to restore: quarantined, and both events say
    # which function (and the restore event which node).
    grant = await cluster.control.acquire("dev", NAME, 30)
    assert grant.start == "fresh"
    failed = events.since(kinds=[EventKind.RESTORE_FAILED])
    assert len(failed) == 3
    assert (failed[-1].function, failed[-1].node_id) == (f"dev/{NAME}", "n1")
    assert attrs(failed[-1])["quarantined"] == "True"
    assert "does not match its digest" in failed[-1].message
    quarantined = events.since(kinds=[EventKind.SNAPSHOT_QUARANTINED])
    assert len(quarantined) == 1
    assert quarantined[0].function == f"dev/{NAME}"
    assert attrs(quarantined[0]) == {"snapshot": fn.snapshot_id}
    # The quarantine is recorded before the restore event: an alert on either finds
    # the snapshot already out of use.
    assert quarantined[0].seq < failed[-1].seq
    assert (await store.run(store.get_snapshot, fn.snapshot_id)).state is \
        SnapshotState.QUARANTINED
    after = await store.run(store.get_function, "dev", NAME)
    assert after.start_mode == "fresh" and "quarantined" in after.reason

    # From now on no restore is tried, so no more failures are reported.
    restores = agent.kinds.count(agent_pb2.START_RESTORE)
    grant = await cluster.control.acquire("dev", NAME, 30)
    assert grant.start == "fresh"
    assert agent.kinds.count(agent_pb2.START_RESTORE) == restores
    assert len(events.since(kinds=[EventKind.RESTORE_FAILED])) == 3
    assert len(events.since(kinds=[EventKind.SNAPSHOT_QUARANTINED])) == 1


async def test_a_restore_that_fails_on_one_node_names_that_node(cluster: Cluster) -> None:
    """Two nodes failing the same way: each event names the node where the restore was
    tried (the first is retried elsewhere, the second quarantines)."""
    first = await add_failing_node(cluster, "n1")
    second = await add_failing_node(cluster, "n2")
    fn = await deploy_with_snapshot(cluster, "n1")
    first.restore_errors = [SnapshotError("bad page table")]
    second.restore_errors = [SnapshotError("bad page table")]
    await cluster.control.acquire("dev", NAME, 30)
    assert first.kinds[0] == second.kinds[0] == agent_pb2.START_RESTORE  # both tried
    (retried,) = cluster.control.events.since(kinds=[EventKind.RESTORE_RETRIED])
    (failed,) = cluster.control.events.since(kinds=[EventKind.RESTORE_FAILED])
    (quarantined,) = cluster.control.events.since(kinds=[EventKind.SNAPSHOT_QUARANTINED])
    assert retried.node_id == "n1"  # it holds the snapshot: tried first
    assert failed.node_id == "n2" and failed.function == f"dev/{NAME}"
    assert quarantined.function == f"dev/{NAME}"
    assert attrs(quarantined)["snapshot"] == fn.snapshot_id
