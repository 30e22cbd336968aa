"""A snapshot is quarantined only for its own faults (scheduler/starts.py,
scheduler/restore_book.py): corrupt bytes at once, a restore failing the same way on
two different nodes, a fingerprint no node can run. A node's trouble (no free slice,
a driver error, a node going away) sends the start to another node or makes it wait,
with an event and a metric, and never quarantines."""

from __future__ import annotations

import asyncio

import pytest

from tests.scheduler.conftest import Cluster, FakeAgent
from tests.scheduler.test_restore_events import (
    NAME,
    FailingRestoreAgent,
    add_failing_node,
    attrs,
    deploy_with_snapshot,
)
from thaw.core.errors import (
    CorruptChunk,
    FingerprintMismatch,
    NodeFault,
    OutOfMemory,
    RestoreFailed,
)
from thaw.proto import agent_pb2, manifest_pb2, scheduler_pb2
from thaw.scheduler.events import EventKind
from thaw.scheduler.states import FunctionState, SnapshotState
from thaw.scheduler.store import FunctionRecord


def restores(agent: FailingRestoreAgent) -> int:
    return agent.kinds.count(agent_pb2.START_RESTORE)


def failures(cluster: Cluster, fault: str, quarantined: bool) -> float:
    value = cluster.control.events.registry.get_sample_value(
        "thaw_restore_failures_total",
        {"fault": fault, "quarantined": "true" if quarantined else "false"})
    return value or 0.0


async def snapshot_state(cluster: Cluster, fn: FunctionRecord) -> SnapshotState:
    store = cluster.control.store
    return (await store.run(store.get_snapshot, fn.snapshot_id)).state


def kinds_of(cluster: Cluster, kind: EventKind) -> list[object]:
    return list(cluster.control.events.since(kinds=[kind]))


async def test_out_of_memory_on_one_node_restores_on_another_without_quarantine(
        cluster: Cluster) -> None:
    a = await add_failing_node(cluster, "a")
    b = await add_failing_node(cluster, "b")
    fn = await deploy_with_snapshot(cluster, "a")  # a holds it: tried first
    a.restore_errors = [OutOfMemory("no device has 2147483648 bytes free for a slice")]

    grant = await cluster.control.acquire("dev", NAME, 30)

    assert grant.start == "restore" and grant.instance.node_id == "b"
    assert (restores(a), restores(b)) == (1, 1)
    assert await snapshot_state(cluster, fn) is SnapshotState.READY
    assert kinds_of(cluster, EventKind.SNAPSHOT_QUARANTINED) == []
    (retried,) = cluster.control.events.since(kinds=[EventKind.RESTORE_RETRIED])
    assert retried.node_id == "a" and retried.function == f"dev/{NAME}"
    assert attrs(retried) == {"fault": "node", "snapshot": fn.snapshot_id}
    assert "no device has" in retried.message
    assert failures(cluster, "node", quarantined=False) == 1
    assert cluster.control.events.registry.get_sample_value(
        "thaw_scheduler_events_total", {"kind": "restore_retried"}) == 1


async def test_the_same_failure_on_two_nodes_quarantines(cluster: Cluster) -> None:
    a = await add_failing_node(cluster, "a")
    b = await add_failing_node(cluster, "b")
    fn = await deploy_with_snapshot(cluster, "a")
    # The same failure, told with each node's own pid and paths.
    a.restore_errors = [RestoreFailed(
        "restore failed: instance 4711 (/run/a/inst-1.sock) raised UnpicklingError: "
        "invalid load key '\\x00' (snapshot_error)")]
    b.restore_errors = [RestoreFailed(
        "restore failed: instance 93 (/srv/b/run/inst-2.sock) raised UnpicklingError: "
        "invalid load key '\\x00' (snapshot_error)")]

    grant = await cluster.control.acquire("dev", NAME, 30)

    assert grant.start == "fresh"
    assert (restores(a), restores(b)) == (1, 1)
    assert await snapshot_state(cluster, fn) is SnapshotState.QUARANTINED
    (retried,) = cluster.control.events.since(kinds=[EventKind.RESTORE_RETRIED])
    assert retried.node_id == "a" and attrs(retried)["fault"] == "unknown"
    (failed,) = cluster.control.events.since(kinds=[EventKind.RESTORE_FAILED])
    assert failed.node_id == "b" and attrs(failed)["quarantined"] == "True"
    (quarantined,) = cluster.control.events.since(kinds=[EventKind.SNAPSHOT_QUARANTINED])
    assert "failed the same way on a and b" in quarantined.message
    assert failures(cluster, "unknown", quarantined=False) == 1
    assert failures(cluster, "unknown", quarantined=True) == 1


async def test_different_failures_on_two_nodes_do_not_quarantine(cluster: Cluster) -> None:
    a = await add_failing_node(cluster, "a")
    b = await add_failing_node(cluster, "b")
    fn = await deploy_with_snapshot(cluster, "a")
    a.restore_errors = [RestoreFailed("restore failed: CUDA error: an illegal memory access "
                                      "(snapshot_error)")]
    b.restore_errors = [RestoreFailed("restore failed: restore did not finish within 120s "
                                      "(deadline_exceeded)")]

    grant = await cluster.control.acquire("dev", NAME, 30)

    # Neither node restores it now: the request is served by a fresh start.
    assert grant.start == "fresh"
    assert await snapshot_state(cluster, fn) is SnapshotState.READY
    assert len(kinds_of(cluster, EventKind.RESTORE_RETRIED)) == 2
    assert kinds_of(cluster, EventKind.SNAPSHOT_QUARANTINED) == []
    (failed,) = cluster.control.events.since(kinds=[EventKind.RESTORE_FAILED])
    assert attrs(failed) == {"quarantined": "False", "snapshot": fn.snapshot_id}
    assert "failed on a, b; starting fresh, the snapshot is kept" in failed.message


async def test_a_digest_mismatch_quarantines_at_once(cluster: Cluster) -> None:
    a = await add_failing_node(cluster, "a")
    b = await add_failing_node(cluster, "b")
    fn = await deploy_with_snapshot(cluster, "a")
    a.restore_errors = [CorruptChunk("chunk 9f2c is corrupt: its bytes hash to 01ab")]

    grant = await cluster.control.acquire("dev", NAME, 30)

    assert grant.start == "fresh"
    assert (restores(a), restores(b)) == (1, 0)  # no second node asked to restore it
    assert await snapshot_state(cluster, fn) is SnapshotState.QUARANTINED
    (failed,) = cluster.control.events.since(kinds=[EventKind.RESTORE_FAILED])
    assert failed.node_id == "a" and attrs(failed)["quarantined"] == "True"
    assert failures(cluster, "snapshot", quarantined=True) == 1


async def test_an_unknown_failure_on_the_only_node_runs_fresh_and_keeps_the_snapshot(
        cluster: Cluster) -> None:
    a = await add_failing_node(cluster, "a")
    fn = await deploy_with_snapshot(cluster, "a")
    a.restore_errors = [RestoreFailed("restore failed: on_restore raised OSError "
                                      "(snapshot_error)")]

    grant = await cluster.control.acquire("dev", NAME, 30)
    assert grant.start == "fresh"
    assert await snapshot_state(cluster, fn) is SnapshotState.READY
    assert len(kinds_of(cluster, EventKind.RESTORE_RETRIED)) == 1
    assert len(kinds_of(cluster, EventKind.RESTORE_FAILED)) == 1

    # Once the record has aged, the node tries the snapshot again (and it restores).
    await cluster.advance(601)
    grant = await cluster.control.acquire("dev", NAME, 30)
    assert grant.start == "restore" and restores(a) == 2


async def test_a_node_fault_on_the_only_node_waits_for_room_then_restores(
        cluster: Cluster) -> None:
    a = await add_failing_node(cluster, "a")
    fn = await deploy_with_snapshot(cluster, "a")
    a.restore_errors = [NodeFault("filling slice on cuda0 failed: cudaErrorLaunchFailure "
                                  "(internal)")]

    waiting = asyncio.create_task(cluster.control.acquire("dev", NAME, 30))
    for _ in range(100):
        if cluster.control.room_waiters:
            break
        await asyncio.sleep(0.01)
    assert cluster.control.room_waiters == 1 and not waiting.done()
    (queued,) = cluster.control.events.since(kinds=[EventKind.PLACEMENT_QUEUED])
    assert "tried: a: filling slice on cuda0 failed" in queued.message
    cluster.control._room.fire()  # room may have appeared: the request tries again

    grant = await asyncio.wait_for(waiting, 5)
    assert grant.start == "restore" and restores(a) == 2
    assert await snapshot_state(cluster, fn) is SnapshotState.READY
    assert kinds_of(cluster, EventKind.SNAPSHOT_QUARANTINED) == []
    assert failures(cluster, "node", quarantined=False) == 1


async def test_a_fingerprint_one_node_refuses_restores_on_another(cluster: Cluster) -> None:
    a = await add_failing_node(cluster, "a")
    b = await add_failing_node(cluster, "b")
    fn = await deploy_with_snapshot(cluster, "a")
    assert restores(b) == 0
    refusal = FingerprintMismatch(
        "snapshot fingerprint mismatch on compute_capability: taken on sm_9x (Hopper), "
        "this node has sm_8x (Ampere/Ada)", field="fingerprint.compute_capability")
    a.restore_errors = [refusal]

    grant = await cluster.control.acquire("dev", NAME, 30)
    assert grant.start == "restore" and grant.instance.node_id == "b"
    assert (restores(a), restores(b)) == (1, 1)
    assert await snapshot_state(cluster, fn) is SnapshotState.READY
    assert failures(cluster, "fingerprint", quarantined=False) == 1


@pytest.mark.parametrize("field", ["fingerprint.driver", "fingerprint.function_version"])
async def test_a_fingerprint_that_no_node_can_run_quarantines(cluster: Cluster,
                                                             field: str) -> None:
    a = await add_failing_node(cluster, "a")
    fn = await deploy_with_snapshot(cluster, "a")
    a.restore_errors = [FingerprintMismatch("snapshot fingerprint mismatch", field=field)]

    grant = await cluster.control.acquire("dev", NAME, 30)
    assert grant.start == "fresh"
    assert await snapshot_state(cluster, fn) is SnapshotState.QUARANTINED


async def test_a_restore_that_succeeds_clears_the_record(cluster: Cluster) -> None:
    a = await add_failing_node(cluster, "a")
    b = await add_failing_node(cluster, "b")
    fn = await deploy_with_snapshot(cluster, "a")
    same = "restore failed: instance died (snapshot_error)"
    a.restore_errors = [RestoreFailed(same)]
    grant = await cluster.control.acquire("dev", NAME, 30)
    assert grant.start == "restore" and grant.instance.node_id == "b"
    # It restores on b, so a's failure was not the snapshot's: a later failure on b
    # alone does not quarantine it.
    assert cluster.control.starts.book.failed_nodes(fn.snapshot_id or "") == {}
    b.restore_errors = [RestoreFailed(same)]
    grant = await cluster.control.acquire("dev", NAME, 30)
    assert await snapshot_state(cluster, fn) is SnapshotState.READY


async def test_a_snapshot_holding_cuda_memory_restores_on_a_cuda_node_only(
        cluster: Cluster) -> None:
    host = await add_failing_node(cluster, "a-host")  # holds it, and sorts first
    gpu = FailingRestoreAgent("b-gpu:1")
    cluster.agents[gpu.address] = gpu
    devices = gpu.devices()
    for device in devices:
        device.kind = "cuda"
    await cluster.control.register(scheduler_pb2.RegisterRequest(
        node_id="b-gpu", control_address=gpu.address, data_url="http://b-gpu",
        devices=devices))
    fn = await deploy_with_snapshot(cluster, "a-host")
    # Its snapshot holds CUDA memory.
    store = cluster.control.store
    snapshot_id = await store.run(store.create_snapshot, fn.id, fn.version, "a-host")
    manifest = manifest_pb2.SnapshotManifest(function=f"dev/{NAME}", version=str(fn.version),
                                             device=manifest_pb2.Arena(size=4096))
    await store.run(store.finish_snapshot, snapshot_id, SnapshotState.READY,
                    manifest=manifest.SerializeToString(), stored_bytes=1000)
    fn = await store.run(store.set_function_state, fn.id, fn.version, FunctionState.READY,
                         "", "restore", snapshot_id)

    grant = await cluster.control.acquire("dev", NAME, 30)
    assert grant.start == "restore" and grant.instance.node_id == "b-gpu"
    assert restores(host) == 0

    # With the cuda node in trouble, the host node serves it fresh rather than waiting.
    gpu.restore_errors = [NodeFault("driver error (internal)")]
    grant = await cluster.control.acquire("dev", NAME, 30)
    assert grant.start == "fresh" and grant.instance.node_id == "a-host"
    assert restores(host) == 0
    assert await snapshot_state(cluster, fn) is SnapshotState.READY


async def test_two_starts_failing_on_a_broken_snapshot_at_once_quarantine_it_once(
        cluster: Cluster) -> None:
    a = await add_failing_node(cluster, "a")
    fn = await deploy_with_snapshot(cluster, "a")
    corrupt = CorruptChunk("chunk 9f2c is corrupt: its bytes hash to 01ab")
    a.restore_errors = [corrupt, corrupt]

    async def fail_late(request: agent_pb2.StartInstanceRequest,
                        timeout: float) -> agent_pb2.StartInstanceResponse:
        a.kinds.append(request.kind)
        await asyncio.sleep(0.05)  # both starts are in flight before either fails
        if request.kind == agent_pb2.START_RESTORE and a.restore_errors:
            raise a.restore_errors.pop(0)
        return await FakeAgent.start_instance(a, request, timeout)

    a.start_instance = fail_late  # type: ignore[method-assign]
    grants = await asyncio.gather(cluster.control.acquire("dev", NAME, 30),
                                  cluster.control.acquire("dev", NAME, 30))
    assert [g.start for g in grants] == ["fresh", "fresh"]
    assert restores(a) == 2
    assert await snapshot_state(cluster, fn) is SnapshotState.QUARANTINED
    assert len(kinds_of(cluster, EventKind.SNAPSHOT_QUARANTINED)) == 1
    assert len(kinds_of(cluster, EventKind.RESTORE_FAILED)) == 2
