"""Where a cold start lands (DESIGN.md §8). Pure: no I/O, no clock, unit-tested with
fake candidates."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


def _tier(c: Candidate) -> int:
    if c.snapshot_pinned:
        return 0
    if c.snapshot_on_disk:
        return 1
    return 2


def _best_fit_leftover(c: Candidate, need: int) -> int | None:
    fitting = [free - need for free in c.device_free if free >= need]
    return min(fitting) if fitting else None


def choose_node(candidates: Iterable[Candidate], need_bytes: int) -> Candidate | None:
    """Nodes holding the snapshot nearer first (pinned, disk, none); then fewer cold
    starts in flight; then best fit (least slice memory left over) on one device."""
    best: tuple[int, int, int, str] | None = None
    chosen: Candidate | None = None
    for c in candidates:
        leftover = _best_fit_leftover(c, need_bytes)
        if leftover is None:
            continue
        key = (_tier(c), c.starts_in_flight, leftover, c.node_id)
        if best is None or key < best:
            best, chosen = key, c
    return chosen
