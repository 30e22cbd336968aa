"""The scheduler's placement and memory-pressure policy, as one typed config.

Read like every component config (core/config.py): `THAW_<FIELD>` in the
environment, then the `[scheduler]` table of `$THAW_CONFIG`, then the default; so
the pressure thresholds are THAW_PRESSURE_AT, THAW_PRESSURE_CRITICAL_AT, ... It is
separate from SchedulerConfig only because core/ belongs to another part of the
project; the fields can move there unchanged.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, ValidationInfo, field_validator

from thaw.core.config import _ComponentConfig


class PolicyConfig(_ComponentConfig):
    _table: ClassVar[str] = "scheduler"

    pressure_at: float = Field(0.80, gt=0, lt=1)
    """Used fraction of a device or pinned tier at which it enters PRESSURE."""
    pressure_critical_at: float = Field(0.90, gt=0, lt=1)
    """Used fraction at which it enters CRITICAL."""
    pressure_emergency_at: float = Field(0.97, gt=0, le=1)
    """Used fraction at which it enters EMERGENCY (no new cold starts on the node)."""
    pressure_hysteresis: float = Field(0.05, ge=0, lt=0.5)
    """A level is left only once usage is this far below the threshold that entered it."""
    pressure_pinned_idle: float = Field(300.0, ge=0)
    """Seconds unused after which a function's pinned snapshot is evicted under CRITICAL."""
    placement_queue_max: int = Field(1000, ge=0)
    """Requests that may wait for room on some node at once; past it: NoCapacity."""
    placement_queue_timeout: float = Field(60.0, gt=0)
    """Longest a request waits for room (nothing fits, nothing to evict)."""
    function_queue_max: int = Field(10_000, ge=1)
    """Requests that may wait for a busy function's instances at once; past it: NoCapacity."""
    priority_aging_rate: float = Field(1.0, ge=0, le=100)
    """Starvation guard: priority levels a waiting invocation gains per second waited
    (effective priority = priority + seconds waited x this); 0 = strict priority."""

    @field_validator("pressure_critical_at", "pressure_emergency_at", "pressure_hysteresis")
    @classmethod
    def _ordered(cls, value: float, info: ValidationInfo) -> float:
        # Fields validate in declaration order: the ones compared against are in data
        # (absent when they were invalid themselves, which is reported on its own).
        below = {"pressure_critical_at": "pressure_at",
                 "pressure_emergency_at": "pressure_critical_at"}.get(info.field_name or "")
        if below is not None and below in info.data and value <= info.data[below]:
            raise ValueError(f"must be above {below} ({info.data[below]})")
        if (info.field_name == "pressure_hysteresis" and "pressure_at" in info.data
                and value >= info.data["pressure_at"]):
            raise ValueError(f"must be below pressure_at ({info.data['pressure_at']})")
        return value
