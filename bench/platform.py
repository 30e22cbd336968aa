"""What the end-to-end benchmarks (coldstart, density, overhead) need of a platform.

The benchmarks are a library: they never start services themselves. Their caller (the
`thaw bench` CLI, ops/bench.py) hands them a factory of the local platform `thaw up`
runs; each benchmark makes one with its own home and devices, starts it, measures
through its gateway and stops it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class Platform(Protocol):
    """A complete platform on this machine: after `start()`, `url` is its gateway and
    `key` an API key of the dev tenant."""

    url: str
    key: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class PlatformFactory(Protocol):
    def __call__(self, home: Path, host_devices: str) -> Platform:
        """A platform, not started yet, keeping its state under `home` and serving the
        host devices `host_devices` (e.g. "2x8GiB")."""
        ...


@contextlib.contextmanager
def service_environment(values: dict[str, str]) -> Iterator[None]:
    """These environment variables set while a platform's services start (they copy
    the environment), as they were before afterwards."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
