"""Autoscaling by the `[scaling]` knobs (DESIGN.md §3, §8). Pure: the control plane
counts, these decide."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from thaw.core.spec import Scaling


def instances_wanted(demand: int, scaling: Scaling) -> int:
    """Enough instances that each serves about target_concurrency of the demand
    (requests running plus requests waiting), within [min_instances, max_instances]."""
    by_load = math.ceil(demand / scaling.target_concurrency) if demand > 0 else 0
    return max(scaling.min_instances, min(scaling.max_instances, by_load))


def should_start(live: int, starting: int, demand: int, scaling: Scaling) -> bool:
    """Start one more instance for this demand? Instances still starting count as
    live: a burst that arrives while the first ones restore starts no more than the
    demand needs in total, not one per waiting request."""
    return live + starting < instances_wanted(demand, scaling)


@dataclass(frozen=True)
class IdleInstanceView:
    instance_id: str
    last_used: float
    window: float
    """Idle time after which it may stop: scaledown_window, shortened under pressure."""


def scale_down(idle: Iterable[IdleInstanceView], live: int, min_instances: int,
               now: float) -> list[str]:
    """Idle instances to stop, least recently used first, never leaving fewer than
    `min_instances` of the function's `live` instances."""
    stop: list[str] = []
    for inst in sorted(idle, key=lambda i: (i.last_used, i.instance_id)):
        if live - len(stop) <= min_instances:
            break
        if now - inst.last_used >= inst.window:
            stop.append(inst.instance_id)
    return stop
