"""Device backends and fractional slices (DESIGN.md §6).

`host` is a first-class backend: each "GPU" is a virtual device with a configured
capacity and a slice is a shared-memory file the instance maps. A `cuda` backend
implements the same interface with one device allocation per slice.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from thaw.core.errors import InvalidArgument, NotFound, OutOfMemory


@dataclass(frozen=True)
class Slice:
    id: str
    device_id: str
    size: int
    path: str
    """What the instance maps: a shm file on the host backend."""


@dataclass(frozen=True)
class DeviceUsage:
    id: str
    kind: str
    capacity: int
    used: int


class DeviceBackend(Protocol):
    kind: str

    def allocate(self, size: int, owner: str) -> Slice: ...
    def release(self, slice_id: str) -> None: ...
    def usage(self) -> list[DeviceUsage]: ...
    def close(self) -> None: ...


@dataclass
class _VirtualDevice:
    id: str
    capacity: int
    slices: dict[str, Slice] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return sum(s.size for s in self.slices.values())


class HostDevices:
    """Virtual devices whose slices are files in a tmpfs folder."""

    kind = "host"

    def __init__(self, capacities: list[int], slice_dir: Path) -> None:
        if not capacities:
            raise InvalidArgument("at least one host device is needed", field="host_devices")
        self._devices = [_VirtualDevice(f"host{i}", cap) for i, cap in enumerate(capacities)]
        self._dir = slice_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def allocate(self, size: int, owner: str) -> Slice:
        """Best fit: the device with the least memory left that still fits `size`."""
        with self._lock:
            fitting = [d for d in self._devices if d.capacity - d.used >= size]
            if not fitting:
                free = max(d.capacity - d.used for d in self._devices)
                raise OutOfMemory(f"no device has {size} bytes free for a slice "
                                  f"(largest free: {free} bytes)")
            device = min(fitting, key=lambda d: (d.capacity - d.used - size, d.id))
            slice_id = f"{owner}-{uuid.uuid4().hex[:8]}"
            path = self._dir / f"slice-{slice_id}"
            # A new tmpfs file reads as zeros: no tenant ever sees another's bytes.
            with open(path, "wb") as handle:
                handle.truncate(size)
            sl = Slice(slice_id, device.id, size, str(path))
            device.slices[slice_id] = sl
            return sl

    def release(self, slice_id: str) -> None:
        with self._lock:
            for device in self._devices:
                sl = device.slices.pop(slice_id, None)
                if sl is not None:
                    # Unlinking drops the pages; a later slice is a new, zero-filled file.
                    Path(sl.path).unlink(missing_ok=True)
                    return
        raise NotFound(f"no slice {slice_id}")

    def usage(self) -> list[DeviceUsage]:
        with self._lock:
            return [DeviceUsage(d.id, self.kind, d.capacity, d.used) for d in self._devices]

    def close(self) -> None:
        with self._lock:
            for device in self._devices:
                for sl in device.slices.values():
                    Path(sl.path).unlink(missing_ok=True)
                device.slices.clear()


def gpu_info() -> tuple[str, str]:
    """(GPU model, driver) for fingerprints; empty strings without NVML or a GPU."""
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        return "", ""
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            model = pynvml.nvmlDeviceGetName(handle)
            driver = pynvml.nvmlSystemGetDriverVersion()
            return (model.decode() if isinstance(model, bytes) else model,
                    driver.decode() if isinstance(driver, bytes) else driver)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return "", ""


def shm_root(base: Path, node_id: str) -> Path:
    root = base / f"thaw-{node_id}-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True)
    return root
