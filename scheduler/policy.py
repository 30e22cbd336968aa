"""The scheduler's placement and memory-pressure policy: the policy fields of
SchedulerConfig (core/config.py), under the name the scheduler's code uses.

They are read like every scheduler setting: `--set KEY=VALUE`, `THAW_<KEY>`, the
`[scheduler]` table of the config file, the default; so the pressure thresholds are
THAW_PRESSURE_AT, THAW_PRESSURE_CRITICAL_AT, ...
"""

from __future__ import annotations

from thaw.core.config import SchedulerConfig

PolicyConfig = SchedulerConfig

__all__ = ["PolicyConfig"]
