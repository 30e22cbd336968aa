"""The one exception hierarchy. Each edge maps these to HTTP or gRPC status with a
single table (thaw.gateway.errors, thaw.core.grpcutil); third-party errors are
translated where they are caught, with `raise ... from exc`."""

from __future__ import annotations


class ThawError(Exception):
    """Base of every error thaw raises on purpose."""

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(ThawError):
    """The caller sent something malformed; `field` names the part at fault."""

    code = "invalid_argument"


class InvalidBundle(InvalidArgument):
    """An uploaded bundle is not a readable tarball with a valid thaw.toml."""

    code = "invalid_bundle"


class BundleTooLarge(InvalidBundle):
    """A bundle passes one of its size limits (packed or unpacked bytes, file count,
    compression ratio, thaw.toml's size); the message names the limit."""

    code = "bundle_too_large"


class NotFound(ThawError):
    """The named function, instance, snapshot, chunk or node does not exist."""

    code = "not_found"


class AlreadyExists(ThawError):
    """Creating something whose name is taken."""

    code = "already_exists"


class Unauthenticated(ThawError):
    """No API key, or one that is unknown, revoked or expired."""

    code = "unauthenticated"


class PermissionDenied(ThawError):
    """The key is valid but lacks the scope for this action."""

    code = "permission_denied"


class FunctionUnavailable(ThawError):
    """The function exists but cannot run: its build failed or it is being deleted."""

    code = "function_unavailable"


class NoCapacity(ThawError):
    """No node can place an instance right now (nothing fits, nothing to evict)."""

    code = "no_capacity"


class DeadlineExceeded(ThawError):
    """An invocation, placement or build ran past its deadline."""

    code = "deadline_exceeded"


class InstanceFailed(ThawError):
    """An instance died or failed while serving a request (crash, OOM, timeout)."""

    code = "instance_failed"


class ImageNotOnNode(InstanceFailed):
    """An image function's image is not on the node's docker engine (nothing is
    pulled): the scheduler tries another docker node."""

    code = "image_not_on_node"


class SnapshotError(ThawError):
    """A snapshot could not be captured, stored or restored."""

    code = "snapshot_error"


class FingerprintMismatch(SnapshotError):
    """A snapshot was taken on a different python/torch/device/driver/version."""

    code = "fingerprint_mismatch"


class RestoreFailed(ThawError):
    """A restore failed in a way not known to be the snapshot's own fault (the restoring
    instance reported an error, died or hung): the scheduler tries another node, and
    quarantines the snapshot only when a second node fails the same way."""

    code = "restore_failed"


class NodeFault(ThawError):
    """A node could not start an instance for reasons of its own (a device or driver
    error, a template that died, a node going down): the start goes to another node or
    waits, and no snapshot is blamed."""

    code = "node_fault"


class ChunkNotFound(NotFound):
    """A chunk the manifest names is in no tier of this node."""

    code = "chunk_not_found"


class CorruptChunk(SnapshotError):
    """A chunk's bytes do not match its SHA-256 digest."""

    code = "corrupt_chunk"


class OutOfMemory(ThawError):
    """A slice or pinned-tier request does not fit in the capacity left."""

    code = "out_of_memory"


class InsufficientStorage(ThawError):
    """A node's data directory is full or read-only: nothing is written there."""

    code = "insufficient_storage"


class QuotaExceeded(ThawError):
    """Starting another instance would take the tenant past its quota (instances or
    slice memory); its warm instances keep serving. `retry_after`: seconds after which
    trying again makes sense (an idle instance may have scaled down by then)."""

    code = "quota_exceeded"
    # Instances idle past their scaledown_window free quota; a few seconds is the
    # earliest a retry can find room.
    retry_after = 5.0


class Unavailable(ThawError):
    """A peer service (scheduler, agent, instance) cannot be reached."""

    code = "unavailable"
