"""Lifecycles the scheduler tracks, each an Enum with one place that checks moves."""

from __future__ import annotations

import enum

from thaw.core.errors import ThawError


class IllegalTransition(ThawError):
    """A lifecycle was asked to move along an edge it does not have."""

    code = "illegal_transition"


class FunctionState(str, enum.Enum):
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"
    DELETED = "deleted"


class SnapshotState(str, enum.Enum):
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"          # capture impossible: the function runs fresh
    QUARANTINED = "quarantined"  # a restore from it failed: never used again


class NodeState(str, enum.Enum):
    READY = "ready"
    CORDONED = "cordoned"  # serves its instances, gets no new ones
    LOST = "lost"


class InstanceState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    GONE = "gone"


_FUNCTION_MOVES = {
    FunctionState.BUILDING: {FunctionState.READY, FunctionState.FAILED, FunctionState.DELETED,
                             FunctionState.BUILDING},
    FunctionState.READY: {FunctionState.BUILDING, FunctionState.DELETED, FunctionState.READY},
    FunctionState.FAILED: {FunctionState.BUILDING, FunctionState.DELETED},
    FunctionState.DELETED: set(),
}
_SNAPSHOT_MOVES = {
    SnapshotState.BUILDING: {SnapshotState.READY, SnapshotState.FAILED},
    SnapshotState.READY: {SnapshotState.QUARANTINED},
    SnapshotState.FAILED: set(),
    SnapshotState.QUARANTINED: set(),
}
_NODE_MOVES = {
    NodeState.READY: {NodeState.LOST, NodeState.READY, NodeState.CORDONED},
    NodeState.CORDONED: {NodeState.READY, NodeState.LOST, NodeState.CORDONED},
    NodeState.LOST: {NodeState.READY, NodeState.CORDONED},
}
_INSTANCE_MOVES = {
    InstanceState.STARTING: {InstanceState.READY, InstanceState.GONE},
    InstanceState.READY: {InstanceState.STOPPING, InstanceState.GONE},
    InstanceState.STOPPING: {InstanceState.GONE},
    InstanceState.GONE: set(),
}
_TABLES: dict[type[enum.Enum], dict] = {
    FunctionState: _FUNCTION_MOVES,
    SnapshotState: _SNAPSHOT_MOVES,
    NodeState: _NODE_MOVES,
    InstanceState: _INSTANCE_MOVES,
}


def check_transition(current: enum.Enum, target: enum.Enum) -> None:
    if target not in _TABLES[type(current)][current]:
        raise IllegalTransition(
            f"{type(current).__name__} cannot move from {current.value} to {target.value}")
