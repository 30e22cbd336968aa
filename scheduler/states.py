"""Lifecycles the scheduler tracks: each an Enum with a table of legal moves, and one
checked way to move an object along them (`move` for in-memory views, `move_row` for
DB rows, whose state column holds the enum's value)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

import structlog

from thaw.core.errors import ThawError

log = structlog.get_logger()


class IllegalTransition(ThawError):
    """A lifecycle was asked to move along an edge it does not have."""

    code = "illegal_transition"


class FunctionState(str, enum.Enum):
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"
    DELETED = "deleted"


class VersionState(str, enum.Enum):
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"


class SnapshotState(str, enum.Enum):
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"          # capture impossible: the function runs fresh
    QUARANTINED = "quarantined"  # a restore from it failed: never used again


class NodeState(str, enum.Enum):
    READY = "ready"
    CORDONED = "cordoned"  # serves its instances, gets no new ones
    RESTARTING = "restarting"  # its agent said it stops: back when it registers again
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
    # A rollback to a kept version (or a deploy that needs no build) serves at once.
    FunctionState.FAILED: {FunctionState.BUILDING, FunctionState.READY, FunctionState.DELETED},
    FunctionState.DELETED: set(),
}
_VERSION_MOVES = {
    VersionState.BUILDING: {VersionState.READY, VersionState.FAILED},
    # A rollback to a version whose snapshot was collected builds it again.
    VersionState.READY: {VersionState.BUILDING, VersionState.READY},
    VersionState.FAILED: set(),
}
_SNAPSHOT_MOVES = {
    SnapshotState.BUILDING: {SnapshotState.READY, SnapshotState.FAILED},
    SnapshotState.READY: {SnapshotState.QUARANTINED},
    SnapshotState.FAILED: set(),
    SnapshotState.QUARANTINED: set(),
}
_NODE_MOVES = {
    NodeState.READY: {NodeState.LOST, NodeState.READY, NodeState.CORDONED,
                      NodeState.RESTARTING},
    NodeState.CORDONED: {NodeState.READY, NodeState.LOST, NodeState.CORDONED,
                         NodeState.RESTARTING},
    # Registered again (READY, or CORDONED when an operator cordoned it), or silent
    # past node_timeout (LOST); a second notice that it stops is the same restart.
    NodeState.RESTARTING: {NodeState.READY, NodeState.CORDONED, NodeState.LOST,
                           NodeState.RESTARTING},
    # A lost node's agent that speaks again only to say it stops.
    NodeState.LOST: {NodeState.READY, NodeState.CORDONED, NodeState.RESTARTING},
}
_INSTANCE_MOVES = {
    InstanceState.STARTING: {InstanceState.READY, InstanceState.GONE},
    InstanceState.READY: {InstanceState.STOPPING, InstanceState.GONE},
    # Stopping again (a retired instance whose last call ended, an eviction victim
    # being stopped) is the same stop.
    InstanceState.STOPPING: {InstanceState.STOPPING, InstanceState.GONE},
    InstanceState.GONE: set(),
}
_TABLES: dict[type[enum.Enum], Mapping[Any, set[Any]]] = {
    FunctionState: _FUNCTION_MOVES,
    VersionState: _VERSION_MOVES,
    SnapshotState: _SNAPSHOT_MOVES,
    NodeState: _NODE_MOVES,
    InstanceState: _INSTANCE_MOVES,
}

S = TypeVar("S", bound=enum.Enum)


class Stateful(Protocol[S]):
    """An in-memory view with a lifecycle (InstanceView, NodeView)."""

    state: S


class StateRow(Protocol):
    """A DB row whose `state` column holds a lifecycle enum's value."""

    state: str


def legal(current: enum.Enum, target: enum.Enum) -> bool:
    return target in _TABLES[type(current)][current]


def check_transition(current: enum.Enum, target: enum.Enum, what: str = "") -> None:
    """IllegalTransition (logged) unless the lifecycle has the edge current -> target."""
    if legal(current, target):
        return
    kind = type(current).__name__
    log.warning("illegal state move refused", lifecycle=kind, what=what,
                current=current.value, target=target.value)
    raise IllegalTransition(f"{kind} cannot move from {current.value} to {target.value}")


def move(obj: Stateful[S], target: S, what: str = "") -> None:
    """Move an in-memory view to `target`: the only way its state changes. An illegal
    move is refused (logged, IllegalTransition) and leaves the state as it was."""
    check_transition(obj.state, target, what)
    obj.state = target


def move_row(row: StateRow, target: enum.Enum, what: str = "") -> None:
    """Move a DB row to `target` (the column keeps the enum's value), checked as `move`."""
    check_transition(type(target)(row.state), target, what)
    row.state = target.value


def set_row(row: StateRow, target: enum.Enum) -> None:
    """Put a row in `target` without a move: a row that starts its lifecycle again (a
    deleted function deployed anew) or is first written."""
    row.state = target.value
