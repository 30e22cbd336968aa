"""An instance's lifecycle on a node: one Enum, one table of legal moves, and one
place that changes an instance's state (`Instance.move`)."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from thaw.core.errors import ThawError
from thaw.platform.runtime import LaunchedInstance

log = structlog.get_logger()


class InstanceState(str, enum.Enum):
    STARTING = "starting"
    RESTORING = "restoring"
    READY = "ready"
    DRAINING = "draining"
    SETUP_FAILED = "setup_failed"
    DEFUNCT = "defunct"


_MOVES: dict[InstanceState, set[InstanceState]] = {
    InstanceState.STARTING: {InstanceState.READY, InstanceState.SETUP_FAILED,
                             InstanceState.DEFUNCT},
    InstanceState.RESTORING: {InstanceState.READY, InstanceState.DEFUNCT},
    InstanceState.READY: {InstanceState.DRAINING, InstanceState.DEFUNCT},
    InstanceState.DRAINING: {InstanceState.DEFUNCT},
    InstanceState.SETUP_FAILED: set(),
    InstanceState.DEFUNCT: set(),
}
# States an instance never leaves: its process is gone or going.
ENDED = frozenset({InstanceState.SETUP_FAILED, InstanceState.DEFUNCT})


class IllegalInstanceTransition(ThawError):
    """An instance was asked to move along an edge its lifecycle does not have."""

    code = "illegal_transition"


@dataclass
class Instance:
    id: str
    function: str  # tenant/name
    version: str
    socket: str
    max_concurrency: int
    timeout: float
    state: InstanceState
    pid: int = 0
    slice_id: str | None = None
    slice_device: str = ""
    slice_bytes: int = 0
    log_path: str = ""
    exit_reason: str = ""
    inflight: int = 0
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    process: LaunchedInstance | None = None
    """The launched instance when the agent started it itself (fresh starts)."""
    input_schema: str = ""
    """The input schema a fresh start's Ready reported (bounded: schema_text)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state" and "state" in self.__dict__:
            raise AttributeError(f"instance {self.id}: state changes only by move()")
        super().__setattr__(name, value)

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def move(self, target: InstanceState) -> None:
        """The one way an instance's state changes; an edge its lifecycle does not
        have is refused (logged, and raised)."""
        if target not in _MOVES[self.state]:
            log.warning("illegal instance transition refused", instance=self.id,
                        state=self.state.value, target=target.value)
            raise IllegalInstanceTransition(
                f"instance {self.id} cannot move from {self.state.value} to {target.value}")
        object.__setattr__(self, "state", target)


def any_busy(instances: Iterable[Instance]) -> bool:
    """Whether a call is in flight on one of `instances`, or one is not serving yet
    (starting, restoring) or any more (draining)."""
    return any(i.inflight or i.state is not InstanceState.READY for i in instances)
