"""Human sizes and durations as they appear in thaw.toml and THAW_* settings."""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "": 1.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float) -> int:
    """Bytes from `2GiB`, `512MiB`, `1.5G`, `4096` or a plain number."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"size must be a finite number: {value!r}")
        if value < 0:
            raise ValueError(f"size must not be negative: {value!r}")
        return int(value)
    match = _NUMBER_UNIT.match(value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB, 2GiB, 0)")
    nbytes = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if not math.isfinite(nbytes):  # hundreds of digits overflow a float
        raise ValueError(f"size must be a finite number: {value!r}")
    return int(nbytes)


def parse_duration(value: str | int | float) -> float:
    """Seconds from `60s`, `500ms`, `5m`, `1h` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"duration must be a finite number: {value!r}")
        if value < 0:
            raise ValueError(f"duration must not be negative: {value!r}")
        return float(value)
    match = _NUMBER_UNIT.match(value)
    if not match or match.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 60s, 5m)")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if not math.isfinite(seconds):  # hundreds of digits overflow a float
        raise ValueError(f"duration must be a finite number: {value!r}")
    return seconds


def format_size(n: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"
