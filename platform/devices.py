"""Device backends and fractional slices (DESIGN.md §6).

`host` is a first-class backend: each "GPU" is a virtual device with a configured
capacity and a slice is a memfd ("thaw-slice-<id>") the instance is handed as a
descriptor and maps shared. A `cuda` backend
(thaw.platform.cuda) implements the same interface with one device allocation per slice.

Whatever differs between backends is asked of this interface, never of a backend's
name: what a slice needs in its instance's environment and sandbox (`Slice`,
`SandboxNeeds`), whether a device is a GPU that NVML reports on (`DeviceUsage.gpu`) and
the GPU model and driver that snapshot fingerprints carry (`DeviceBackend.gpu_info`).
The backend a node runs is chosen from its settings in thaw.platform.device_setup.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from thaw.core.errors import InvalidArgument, NotFound, OutOfMemory
from thaw.snapshotter.runtime.events import SliceDescriptor

__all__ = ["DeviceBackend", "DeviceSettings", "DeviceUsage", "HostDevices", "HostSlice",
           "SandboxNeeds", "Slice", "SliceDescriptor", "gpu_info", "nvml_text", "shm_root"]

# A host slice's memfd keeps its size: the instance holding it can neither grow it past
# what was booked nor shrink it under the agent's mapping; it writes in place.
SLICE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@dataclass(frozen=True)
class Slice:
    id: str
    device_id: str
    size: int
    path: str
    """Unused by both backends (a host slice is a memfd, a cuda slice an IPC handle)."""

    def gpu_ids(self) -> tuple[str, ...]:
        """GPUs (UUIDs) the instance's sandbox must be able to open for this slice."""
        return ()

    def instance_env(self) -> dict[str, str]:
        """Environment the instance must start with for the slice's limits to apply."""
        return {}


@dataclass(frozen=True)
class HostSlice(Slice):
    """A host backend slice: a memfd of `size` bytes, zero-filled when made."""

    fd: int
    """The agent's descriptor; the instance gets its own copy with the spawn request."""

    def descriptor(self) -> SliceDescriptor:
        return SliceDescriptor(kind="host", size=self.size)


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

    def allocate(self, size: int, owner: str, *, compute_percent: int = 0,
                 restore: bool = False, resident: int | None = None) -> Slice:
        """A slice of `size` bytes for `owner`. `compute_percent`: the function's share
        of the GPU's compute (applied where compute_shares_enforced); `restore`: the
        slice is about to be filled by a restore (counted on its link from now);
        `resident`: how much of it the restore fills (a GPU allocates only that and
        books the rest for the instance's own allocator; None: all of it)."""
        ...

    def release(self, slice_id: str) -> None: ...
    def usage(self) -> list[DeviceUsage]: ...
    def close(self) -> None: ...

    def sandbox_needs(self) -> SandboxNeeds:
        """What sandboxes of instances holding this backend's slices must grant."""
        ...

    def compute_shares_enforced(self) -> bool:
        """Whether a function's gpu_compute share is applied on these devices."""
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
    """Virtual devices whose slices are memfds."""

    kind = "host"

    def __init__(self, capacities: list[int], slice_dir: Path | None = None) -> None:
        """`slice_dir` is accepted for the device settings' signature; slices are
        memfds and need no folder."""
        del slice_dir
        if not capacities:
            raise InvalidArgument("at least one host device is needed", field="host_devices")
        self._devices = [_VirtualDevice(f"host{i}", cap) for i, cap in enumerate(capacities)]
        self._lock = threading.Lock()

    def allocate(self, size: int, owner: str, *, compute_percent: int = 0,
                 restore: bool = False, resident: int | None = None) -> HostSlice:
        """Best fit: the device with the least memory left that still fits `size`.
        Host devices share no compute and have one link: the other arguments do not
        change where the slice goes."""
        del compute_percent, restore, resident
        with self._lock:
            fitting = [d for d in self._devices if d.capacity - d.used >= size]
            if not fitting:
                free = max(d.capacity - d.used for d in self._devices)
                raise OutOfMemory(f"no device has {size} bytes free for a slice "
                                  f"(largest free: {free} bytes)")
            device = min(fitting, key=lambda d: (d.capacity - d.used - size, d.id))
            slice_id = f"{owner}-{uuid.uuid4().hex[:8]}"
            sl = HostSlice(slice_id, device.id, size, "", _slice_memfd(slice_id, size))
            device.slices[slice_id] = sl
            return sl

    def release(self, slice_id: str) -> None:
        with self._lock:
            for device in self._devices:
                sl = device.slices.pop(slice_id, None)
                if sl is not None:
                    # The pages go with the last descriptor and mapping (the instance is
                    # stopped first); a later slice is a new, zero-filled memfd.
                    _close_slice(sl)
                    return
        raise NotFound(f"no slice {slice_id}")

    def usage(self) -> list[DeviceUsage]:
        with self._lock:
            return [DeviceUsage(d.id, self.kind, d.capacity, d.used) for d in self._devices]

    def close(self) -> None:
        with self._lock:
            for device in self._devices:
                for sl in device.slices.values():
                    _close_slice(sl)
                device.slices.clear()

    def sandbox_needs(self) -> SandboxNeeds:
        """Nothing: a slice is a descriptor sent over the instance's control socket."""
        return SandboxNeeds()

    def compute_shares_enforced(self) -> bool:
        """No: host devices have no compute share to apply."""
        return False

    def gpu_info(self) -> tuple[str, str]:
        return "", ""


def _slice_memfd(slice_id: str, size: int) -> int:
    """A new memfd reads as zeros: no tenant ever sees another's bytes."""
    fd = os.memfd_create(f"thaw-slice-{slice_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SLICE_SEALS)
    except OSError as exc:
        os.close(fd)
        raise OutOfMemory(f"cannot make a {size}-byte host slice: {exc}") from exc
    return fd


def _close_slice(sl: Slice) -> None:
    if isinstance(sl, HostSlice):
        with contextlib.suppress(OSError):
            os.close(sl.fd)


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
