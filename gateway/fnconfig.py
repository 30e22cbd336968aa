"""A function's configuration (its thaw.toml as the scheduler stores it, JSON) read
once into a typed view. Every part of the gateway that needs the configuration takes
it from `config_of`, which parses each distinct document once (a function's version
keeps its document, so this is once per function version per replica)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

# Distinct configuration documents kept parsed (one per function version in use).
CONFIG_CACHE_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class FunctionConfig:
    """What the gateway reads of a function's configuration."""

    document: dict[str, Any]
    """The whole configuration, as the management API shows it. Shared by every
    caller: read it, never change it."""
    max_body: int
    """`[limits] max_body` in bytes; 0: none (the gateway's max_body_bytes holds), or a
    value this gateway cannot read."""
    gpu_memory: int
    """`[resources] gpu_memory` in bytes; 0: a CPU-only function."""
    gpu_compute: int
    """`[resources] gpu_compute`, percent of the GPU's SMs; 0: not set."""


def _int(table: object, key: str) -> int:
    try:
        return int(table.get(key) or 0)  # type: ignore[attr-defined]
    except (ValueError, TypeError, AttributeError):
        return 0


@functools.lru_cache(maxsize=CONFIG_CACHE_ENTRIES)
def config_of(config_json: str) -> FunctionConfig:
    """The typed view of a function's configuration document ("" is an empty one).
    Raises ValueError when the document is not JSON."""
    document = json.loads(config_json or "{}")
    table = document if isinstance(document, dict) else {}
    limits = table.get("limits") or {}
    resources = table.get("resources") or {}
    return FunctionConfig(document=document, max_body=max(_int(limits, "max_body"), 0),
                          gpu_memory=_int(resources, "gpu_memory"),
                          gpu_compute=_int(resources, "gpu_compute"))
