"""Whose fault a failed restore is (platform/restore_faults.py on the node,
scheduler/restore_book.py at the scheduler), and that the verdict survives the gRPC
error mapping between them."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from thaw.core.errors import (
    ChunkNotFound,
    CorruptChunk,
    DeadlineExceeded,
    FingerprintMismatch,
    ImageNotOnNode,
    InstanceFailed,
    NodeFault,
    OutOfMemory,
    RestoreFailed,
    SnapshotError,
    ThawError,
    Unavailable,
)
from thaw.core.grpcutil import decode_error, encode_error, status_for
from thaw.platform.cuda.api import CudaUnavailable
from thaw.platform.restore_faults import restore_fault
from thaw.scheduler.restore_book import Fault, RestoreBook, failure_signature, fault_of


def snapshot_error_from_disk() -> SnapshotError:
    try:
        try:
            raise OSError(5, "Input/output error")
        except OSError as exc:
            raise SnapshotError(f"cannot read snapshot chunks: {exc}") from exc
    except SnapshotError as err:
        return err


@pytest.mark.parametrize("exc", [
    CorruptChunk("chunk ab12 is corrupt: its bytes hash to cd34"),
    FingerprintMismatch("snapshot fingerprint mismatch on driver", field="fingerprint.driver"),
    OutOfMemory("no device has 2147483648 bytes free for a slice"),
    ChunkNotFound("2 chunk(s) are on no reachable node"),
    ImageNotOnNode("image sha256:ab is not on this node"),
    Unavailable("peer unavailable"),
    NodeFault("already classified"),
    RestoreFailed("already classified"),
    asyncio.CancelledError(),
])
def test_errors_that_say_whose_fault_they_are_pass_unchanged(exc: BaseException) -> None:
    assert restore_fault(exc) is exc


@pytest.mark.parametrize("exc", [
    SnapshotError("restore failed: on_restore raised KeyError: 'tokenizer'"),
    DeadlineExceeded("restore did not finish within 120s"),
    InstanceFailed("restored instance exited before it was ready; last output:\nSegfault"),
])
def test_a_failure_of_the_restoring_instance_is_not_known_to_be_the_snapshots(
        exc: ThawError) -> None:
    reported = restore_fault(exc)
    assert isinstance(reported, RestoreFailed)
    assert reported.message.startswith("restore failed")
    assert reported.message.endswith(f"({exc.code})")
    assert exc.message.removeprefix("restore failed: ") in reported.message


@pytest.mark.parametrize("exc", [
    InstanceFailed("template failed: ModuleNotFoundError: No module named 'x'"),
    InstanceFailed("template is not reachable: [Errno 111] Connection refused"),
    InstanceFailed("docker engine: 500 Server Error"),
    InstanceFailed("restored instance (pid 7 in container thaw-i-1) is not among the "
                   "container's processes"),
    CudaUnavailable("the cuda device backend found no usable CUDA driver"),
    ThawError("copying into slice on cuda0 failed: cudaErrorLaunchFailure"),
    snapshot_error_from_disk(),
    OSError(28, "No space left on device"),
    RuntimeError("an agent bug"),
])
def test_the_nodes_own_trouble_is_a_node_fault(exc: Exception) -> None:
    reported = restore_fault(exc)
    assert isinstance(reported, NodeFault)
    assert str(exc).split(":")[0] in reported.message


@pytest.mark.parametrize("exc", [
    RestoreFailed("restore failed: bad page table (snapshot_error)"),
    NodeFault("cudaErrorLaunchFailure (internal)"),
])
def test_the_verdict_survives_the_grpc_error_mapping(exc: ThawError) -> None:
    class Err(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return status_for(exc)

        def details(self) -> str:
            return encode_error(exc)

    back = decode_error(Err())
    assert type(back) is type(exc) and back.message == exc.message


# ---- at the scheduler --------------------------------------------------------------

def test_the_scheduler_reads_the_fault_from_the_class() -> None:
    assert fault_of(CorruptChunk("x")) is Fault.SNAPSHOT
    assert fault_of(FingerprintMismatch("x", field="fingerprint.function_version")) is \
        Fault.SNAPSHOT
    assert fault_of(FingerprintMismatch("x", field="fingerprint.driver")) is Fault.FINGERPRINT
    assert fault_of(RestoreFailed("x")) is Fault.UNKNOWN
    assert fault_of(SnapshotError("from an agent that does not classify")) is Fault.UNKNOWN
    assert fault_of(ChunkNotFound("x")) is Fault.CHUNKS
    for node in (NodeFault("x"), OutOfMemory("x"), Unavailable("x"), ImageNotOnNode("x")):
        assert fault_of(node) is Fault.NODE
    assert fault_of(InstanceFailed("setup failed: boom")) is None


def test_the_same_failure_on_two_nodes_reads_the_same() -> None:
    on_a = RestoreFailed("restore failed: instance 4711 at /run/thaw/a/inst-9f8e7d6c5b.sock "
                         "on node-a died: CUDA error at 0x7f3a2c000000 (snapshot_error)")
    on_b = RestoreFailed("restore failed: instance 88 at /var/run/b/inst-0a1b2c3d4e.sock "
                         "on node-b died: CUDA error at 0x7f00aa000000 (snapshot_error)")
    assert failure_signature(on_a, "node-a") == failure_signature(on_b, "node-b")
    other = RestoreFailed("restore failed: on_restore raised KeyError: 'x' (snapshot_error)")
    assert failure_signature(other, "node-a") != failure_signature(on_a, "node-a")
    # The class is part of it.
    assert failure_signature(NodeFault(on_a.message), "node-a") != \
        failure_signature(on_a, "node-a")


def test_the_book_finds_a_second_node_failing_the_same_way() -> None:
    book = RestoreBook()
    assert book.record("s1", "a", Fault.UNKNOWN, "restore_failed: x") is None
    # The same node again proves nothing.
    assert book.record("s1", "a", Fault.UNKNOWN, "restore_failed: x") is None
    assert book.record("s1", "b", Fault.UNKNOWN, "restore_failed: y") is None
    assert book.record("s1", "c", Fault.UNKNOWN, "restore_failed: x") == "a"
    assert book.failed_nodes("s1") == {"a": "restore_failed: x", "b": "restore_failed: y",
                                       "c": "restore_failed: x"}
    # Another snapshot's record is its own.
    assert book.record("s2", "b", Fault.UNKNOWN, "restore_failed: x") is None
    book.forget("s1")
    assert book.failed_nodes("s1") == {}


def test_a_fingerprint_is_refused_by_all_only_when_every_node_refused() -> None:
    book = RestoreBook()
    book.record("s", "a", Fault.FINGERPRINT, "fingerprint_mismatch: driver")
    assert not book.refused_by_all("s", ["a", "b"])
    book.record("s", "b", Fault.UNKNOWN, "restore_failed: x")
    assert not book.refused_by_all("s", ["a", "b"])
    book.record("s", "b", Fault.FINGERPRINT, "fingerprint_mismatch: compute capability")
    assert book.refused_by_all("s", ["a", "b"])
    assert not book.refused_by_all("s", [])


def test_the_book_is_bounded() -> None:
    book = RestoreBook(capacity=2)
    for snapshot in ("s1", "s2", "s3"):
        book.record(snapshot, "a", Fault.UNKNOWN, "x")
    assert book.failed_nodes("s1") == {} and book.failed_nodes("s3") == {"a": "x"}


def test_failures_are_counted_by_fault() -> None:
    book = RestoreBook()
    book.count(Fault.NODE, False)
    book.count(Fault.NODE, False)
    book.count(Fault.SNAPSHOT, True)
    registry = book.registry
    assert registry.get_sample_value(
        "thaw_restore_failures_total", {"fault": "node", "quarantined": "false"}) == 2
    assert registry.get_sample_value(
        "thaw_restore_failures_total", {"fault": "snapshot", "quarantined": "true"}) == 1
