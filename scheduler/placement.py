"""Where a cold start lands, and what to evict when nothing fits (DESIGN.md §8).

Pure: no I/O, no clock; the control plane builds the inputs from its node and
instance views and acts on the answer. Unit-tested with fake candidates and timed by
bench/placement.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    node_id: str
    device_free: Sequence[int]
    """Free slice memory on each device of the node, in bytes."""
    snapshot_pinned: bool = False
    """The node's pinned (host-memory) tier holds the snapshot's chunks."""
    snapshot_on_disk: bool = False
    """The node's disk tier holds them."""
    starts_in_flight: int = 0
    """Cold starts running on the node now: they share PCIe / memory bandwidth."""
    same_function: int = 0
    """Instances of the function being placed already there: among equally good
    fits, spread them, so that losing one node does not lose all of them."""


@dataclass(frozen=True)
class IdleInstance:
    """A warm instance serving nothing: what eviction may stop to make room."""

    instance_id: str
    function_id: str
    node_id: str
    device_index: int
    nbytes: int
    last_used: float


@dataclass(frozen=True)
class EvictionPlan:
    node_id: str
    device_index: int
    victims: tuple[IdleInstance, ...]
    """Least recently used first; stopping all of them makes the slice fit."""


def _tier(c: Candidate) -> int:
    if c.snapshot_pinned:
        return 0
    if c.snapshot_on_disk:
        return 1
    return 2


def best_fit_device(device_free: Sequence[int], need: int) -> int | None:
    """The device with the least memory left over that still fits `need`; ties go to
    the lower index. The agent allocates with the same rule (platform/devices.py
    HostDevices.allocate), so the scheduler's ledger names the device it will use."""
    best: int | None = None
    best_left = 0
    for index, free in enumerate(device_free):
        left = free - need
        if left >= 0 and (best is None or left < best_left):
            best, best_left = index, left
    return best


def choose_node(candidates: Iterable[Candidate], need_bytes: int) -> Candidate | None:
    """Nodes holding the snapshot nearer first (pinned, disk, none); then fewer cold
    starts in flight; then best fit (least slice memory left over) on one device;
    then fewer instances of the same function."""
    best: tuple[int, int, int, int, str] | None = None
    chosen: Candidate | None = None
    for c in candidates:
        leftover = -1
        for free in c.device_free:
            left = free - need_bytes
            if left >= 0 and (leftover < 0 or left < leftover):
                leftover = left
        if leftover < 0:
            continue
        key = (_tier(c), c.starts_in_flight, leftover, c.same_function, c.node_id)
        if best is None or key < best:
            best, chosen = key, c
    return chosen


def plan_eviction(candidates: Iterable[Candidate], idle: Iterable[IdleInstance],
                  need_bytes: int, spare: Mapping[str, int]) -> EvictionPlan | None:
    """The fewest idle instances whose stopping makes a slice of `need_bytes` fit on
    one device, taken least recently used first, never more of a function than
    `spare[function_id]` (its live instances above min_instances).

    Among devices that can be freed, prefer fewer victims, then victims idle longest
    (the newest last_used among them is oldest), then the node nearer the snapshot,
    then the node id (deterministic)."""
    by_device: dict[tuple[str, int], list[IdleInstance]] = {}
    for inst in idle:
        by_device.setdefault((inst.node_id, inst.device_index), []).append(inst)
    best: tuple[int, float, int, str, int] | None = None
    plan: EvictionPlan | None = None
    for c in candidates:
        for index, free in enumerate(c.device_free):
            if free >= need_bytes:
                return EvictionPlan(c.node_id, index, ())  # fits already: nothing to evict
            victims = by_device.get((c.node_id, index))
            if not victims:
                continue
            taken: list[IdleInstance] = []
            used: dict[str, int] = {}
            room = free
            for inst in sorted(victims, key=lambda i: (i.last_used, i.instance_id)):
                if used.get(inst.function_id, 0) >= spare.get(inst.function_id, 0):
                    continue
                used[inst.function_id] = used.get(inst.function_id, 0) + 1
                taken.append(inst)
                room += inst.nbytes
                if room >= need_bytes:
                    break
            if room < need_bytes:
                continue
            key = (len(taken), taken[-1].last_used, _tier(c), c.node_id, index)
            if best is None or key < best:
                best = key
                plan = EvictionPlan(c.node_id, index, tuple(taken))
    return plan
