"""Memory pressure per device and per pinned tier (DESIGN.md §8).

Each resource of each node is in one level, NORMAL -> PRESSURE -> CRITICAL ->
EMERGENCY, moved by `next_level` (the one place that decides a move) from the used
fraction in the node's heartbeats. A level is entered at its threshold and left only
once usage is `hysteresis` below it, so usage hovering at a threshold does not flap.
The control plane acts on the levels (graduated eviction, refusing cold starts); this
module is pure.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PINNED = "pinned"
"""Resource name of a node's pinned (host-memory) tier; devices are `device:<id>`."""


def device_resource(device_id: str) -> str:
    return f"device:{device_id}"


class PressureLevel(enum.IntEnum):
    NORMAL = 0
    PRESSURE = 1
    CRITICAL = 2
    EMERGENCY = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Thresholds:
    pressure: float = 0.80
    critical: float = 0.90
    emergency: float = 0.97
    hysteresis: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.pressure < self.critical < self.emergency <= 1:
            raise ValueError("thresholds must satisfy 0 < pressure < critical < emergency <= 1")
        if not 0 <= self.hysteresis < self.pressure:
            raise ValueError("hysteresis must be in [0, pressure)")

    def enter(self, level: PressureLevel) -> float:
        """The used fraction at which `level` is entered (NORMAL: 0)."""
        return (0.0, self.pressure, self.critical, self.emergency)[level]


def _highest(used: float, thresholds: Thresholds, slack: float) -> PressureLevel:
    level = PressureLevel.NORMAL
    for candidate in PressureLevel:
        if used >= thresholds.enter(candidate) - slack:
            level = candidate
    return level


def next_level(current: PressureLevel, used_fraction: float,
               thresholds: Thresholds) -> PressureLevel:
    """Rise straight to the highest level whose threshold usage has reached; fall only
    to the level whose threshold, less the hysteresis, usage is still at."""
    rising = _highest(used_fraction, thresholds, 0.0)
    if rising >= current:
        return rising
    return min(current, _highest(used_fraction, thresholds, thresholds.hysteresis))


@dataclass(frozen=True)
class Reading:
    resource: str
    used: int
    capacity: int

    @property
    def fraction(self) -> float:
        return self.used / self.capacity if self.capacity > 0 else 0.0


@dataclass(frozen=True)
class LevelChange:
    node_id: str
    resource: str
    previous: PressureLevel
    level: PressureLevel
    used_fraction: float


@dataclass
class ResourceState:
    level: PressureLevel = PressureLevel.NORMAL
    used: int = 0
    capacity: int = 0

    @property
    def fraction(self) -> float:
        return self.used / self.capacity if self.capacity > 0 else 0.0


class PressureTracker:
    """The level of every (node, resource), updated from readings."""

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self._nodes: dict[str, dict[str, ResourceState]] = {}
        self._worst: dict[str, PressureLevel] = {}
        """Per node, the worst level among its resources (kept by observe): placement
        reads it for every node of every decision."""
        self.on_change: Callable[[str], None] | None = None
        """Told a node's id when its worst level changes (PlacementIndex.touch)."""

    def observe(self, node_id: str, readings: Iterable[Reading]) -> list[LevelChange]:
        """Take a node's current readings; the levels that moved, in reading order."""
        resources = self._nodes.setdefault(node_id, {})
        changes = []
        for reading in readings:
            state = resources.setdefault(reading.resource, ResourceState())
            state.used, state.capacity = reading.used, reading.capacity
            level = next_level(state.level, reading.fraction, self.thresholds)
            if level is not state.level:
                changes.append(LevelChange(node_id, reading.resource, state.level, level,
                                           reading.fraction))
                state.level = level
        worst = max((r.level for r in resources.values()), default=PressureLevel.NORMAL)
        if self._worst.get(node_id) is not worst:
            self._worst[node_id] = worst
            if self.on_change is not None:
                self.on_change(node_id)
        return changes

    def level(self, node_id: str, resource: str) -> PressureLevel:
        state = self._nodes.get(node_id, {}).get(resource)
        return PressureLevel.NORMAL if state is None else state.level

    def node_level(self, node_id: str) -> PressureLevel:
        """The worst level among the node's resources."""
        return self._worst.get(node_id, PressureLevel.NORMAL)

    def resources(self, node_id: str) -> dict[str, ResourceState]:
        return dict(self._nodes.get(node_id, {}))

    def forget(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)
        if self._worst.pop(node_id, None) is not None and self.on_change is not None:
            self.on_change(node_id)
