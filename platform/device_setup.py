"""Choosing a node's device backend from its settings: the one place a backend is
picked by its name (everything else asks the DeviceBackend interface)."""

from __future__ import annotations

from pathlib import Path

from thaw.blobstore import CudaPinnedAllocator, HostMemoryAllocator
from thaw.core.config import parse_host_devices
from thaw.platform.devices import DeviceBackend, DeviceSettings, HostDevices


def open_devices(settings: DeviceSettings, slice_dir: Path
                 ) -> tuple[DeviceBackend, HostMemoryAllocator | None]:
    """The device backend `settings` names, and the host memory the pinned tier should
    take its regions from so that copies into its slices run at full speed (None: the
    tier's default). Both are sealed memfds of exact size: page-locked with
    cudaHostRegister on cuda, mlock'ed on the host where RLIMIT_MEMLOCK allows (the
    tier's usage says whether they are). Host slices are memfds (`slice_dir` is not used)."""
    if settings.device == "cuda":
        # Imported here: the cuda backend's modules are only needed on a GPU node.
        from thaw.platform.cuda import CudaDevices

        # Page-locked host memory: host-to-device copies at PCIe speed.
        return CudaDevices.from_settings(settings), CudaPinnedAllocator()
    return HostDevices(parse_host_devices(settings.host_devices), slice_dir), None
