"""Device backends and fractional slices (DESIGN.md §6).

`host` is a first-class backend: each "GPU" is a virtual device with a configured
capacity and a slice is a shared-memory file the instance maps. A `cuda` backend
(thaw.platform.cuda) implements the same interface with one device allocation per slice.

Whatever differs between backends is asked of this interface, never of a backend's
name: what a slice needs in its instance's environment and sandbox (`Slice`,
`SandboxNeeds`), whether a device is a GPU that NVML reports on (`DeviceUsage.gpu`) and
the GPU model and driver that snapshot fingerprints carry (`DeviceBackend.gpu_info`).
The backend a node runs is chosen from its settings in thaw.platform.device_setup.
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

    def gpu_ids(self) -> tuple[str, ...]:
        """GPUs (UUIDs) the instance's sandbox must be able to open for this slice."""
        return ()

    def instance_env(self) -> dict[str, str]:
        """Environment the instance must start with for the slice's limits to apply."""
        return {}


@dataclass(frozen=True)
class DeviceUsage:
    id: str
    kind: str
    capacity: int
    used: int
    gpu: bool = False
    """A physical GPU, whose utilisation NVML reports (in the backend's device order)."""


@dataclass(frozen=True)
class SandboxNeeds:
    """What a runtime that walls instances off (docker) must grant an instance for it to
    open a slice of the backend."""

    gpus: bool = False
    """Request GPUs for the sandbox: a slice's `gpu_ids`, or every GPU for a template
    (its instances may get slices on any)."""
    host_pid_namespace: bool = False
    """The slice is opened through a handle that only resolves from the exporting
    agent's PID namespace (legacy CUDA IPC), so the instance shares it; its instances
    then need uids of their own to stay out of each other's processes."""


class DeviceBackend(Protocol):
    kind: str
    """Shown in usage and telemetry ("host", "cuda"); the snapshot fingerprint's device
    type."""

    def allocate(self, size: int, owner: str) -> Slice: ...
    def release(self, slice_id: str) -> None: ...
    def usage(self) -> list[DeviceUsage]: ...
    def close(self) -> None: ...

    def sandbox_needs(self) -> SandboxNeeds:
        """What sandboxes of instances holding this backend's slices must grant."""
        ...

    def gpu_info(self) -> tuple[str, str]:
        """(GPU model, driver version) for snapshot fingerprints; empty strings where
        the devices are not GPUs or NVML cannot say."""
        ...


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

    def sandbox_needs(self) -> SandboxNeeds:
        """Nothing: a slice is a file, mounted like any other."""
        return SandboxNeeds()

    def gpu_info(self) -> tuple[str, str]:
        return "", ""


class DeviceSettings(Protocol):
    """The agent settings that choose and size its device backend."""

    @property
    def device(self) -> str:
        """"host" or "cuda"."""
        ...

    @property
    def host_devices(self) -> str:
        """host backend: the virtual devices' capacities ("2x8GiB")."""
        ...

    @property
    def cuda_reserve(self) -> str: ...
    @property
    def cuda_instance_overhead(self) -> str: ...
    @property
    def cuda_mps(self) -> str: ...


def gpu_info() -> tuple[str, str]:
    """(model of NVML's first GPU, driver version) for snapshot fingerprints; empty
    strings without pynvml, NVML or a GPU. A caller holding a backend asks
    `DeviceBackend.gpu_info`, which answers without NVML for virtual devices."""
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        return "", ""
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return (nvml_text(pynvml.nvmlDeviceGetName(handle)),
                    nvml_text(pynvml.nvmlSystemGetDriverVersion()))
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return "", ""


def nvml_text(value: object) -> str:
    """A string NVML returns: bytes from older pynvml releases, str from newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


def shm_root(base: Path, node_id: str) -> Path:
    root = base / f"thaw-{node_id}-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True)
    return root
