"""Whose fault a failed restore is, decided on the node where it failed.

The scheduler quarantines a snapshot only for the snapshot's own faults (docs/gpu.md,
"Snapshot compatibility"); for that the error it gets from StartInstance must say
whose fault the failure is. There are three answers:

- the snapshot's, proven: its bytes do not match their digests (CorruptChunk), or its
  fingerprint does not fit this node (FingerprintMismatch): passed on as they are;
- the node's: a device, driver or disk error, a template that died, a start on a node
  going down (NodeFault), or an error the scheduler already treats as the node's
  (OutOfMemory for no free slice, ImageNotOnNode, ChunkNotFound, Unavailable): the
  scheduler places the start elsewhere or queues it;
- not known (RestoreFailed): the restoring instance itself reported an error, died or
  hung. That may be the snapshot or this node; the scheduler finds out by trying
  another node and quarantines only when a second node fails the same way.
"""

from __future__ import annotations

import re

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

# Errors whose class already tells the scheduler what to do with the start.
_SELF_EXPLAINING: tuple[type[ThawError], ...] = (
    CorruptChunk, FingerprintMismatch, ChunkNotFound, ImageNotOnNode, OutOfMemory,
    Unavailable, RestoreFailed, NodeFault)
# InstanceFailed is raised both by the agent's own machinery (templates, the docker
# engine, sockets, finding a container's pids: the node's trouble) and when the
# restoring instance exits before it is ready (process.py and docker/spawn.py,
# "restored instance exited before it was ready"): only the latter may be the
# snapshot's doing.
_INSTANCE_DIED = re.compile(r"^restored instance exited\b")


def restore_fault(exc: BaseException) -> BaseException:
    """The error to report for a restore that raised `exc`: `exc` itself where its
    class already says whose fault it is (or it is no Exception, e.g. a cancellation),
    else a NodeFault or RestoreFailed carrying its message and code (raise it `from
    exc`)."""
    if not isinstance(exc, Exception) or isinstance(exc, _SELF_EXPLAINING):
        return exc
    if not isinstance(exc, ThawError):
        return NodeFault(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, SnapshotError) and isinstance(exc.__cause__, OSError):
        # The node's copy could not be read (disk, tmpfs): the bytes were not judged.
        return NodeFault(_tagged(exc), field=exc.field)
    if (isinstance(exc, (SnapshotError, DeadlineExceeded))
            or (isinstance(exc, InstanceFailed) and _INSTANCE_DIED.match(exc.message))):
        text = exc.message if exc.message.startswith("restore failed") else (
            f"restore failed: {exc.message}")
        return RestoreFailed(f"{text} ({exc.code})", field=exc.field)
    return NodeFault(_tagged(exc), field=exc.field)


def _tagged(exc: ThawError) -> str:
    """The message with the original error's code, which the new class hides."""
    return f"{exc.message} ({exc.code})"
