"""The real CudaApi: CuPy's runtime bindings for allocations, IPC handles and streams,
pynvml for each GPU's memory and UUID. Both are imported when the api is built, never
when this module is imported, so the package loads without a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import structlog

from thaw.core.errors import OutOfMemory, ThawError
from thaw.platform.cuda.api import (
    CUDA_ERROR_MEMORY_ALLOCATION,
    CUDA_MEMCPY_HOST_TO_DEVICE,
    CUDA_STREAM_NON_BLOCKING,
    DEFAULT_MPS_PIPE_DIRECTORY,
    NVML_TOPOLOGY_INTERNAL,
    CudaDeviceInfo,
    CudaUnavailable,
    DeviceTopology,
)
from thaw.platform.cuda.topology import normal_bus_id
from thaw.platform.devices import nvml_text

log = structlog.get_logger()

# Copies timed by `h2d_gbps`: the first one also pays for mapping the buffers.
H2D_MEASURE_COPIES = 3
# cudaHostAllocDefault: page-locked, for the measurement's source buffer.
CUDA_HOST_ALLOC_DEFAULT = 0


class CupyCudaApi:  # pragma: no cover - needs CuPy and a GPU (tests/gpu)
    """CudaApi on CuPy's runtime bindings, with pynvml for capacity and identity."""

    def __init__(self) -> None:
        try:
            import cupy
        except ImportError as exc:
            raise CudaUnavailable(
                "the cuda device backend needs CuPy, which is not importable here "
                f"({exc}); install cupy-cuda12x (or cupy-cuda11x) to match the driver, or "
                "run the agent with THAW_DEVICE=host") from exc
        self._cupy: Any = cupy
        self._rt: Any = cupy.cuda.runtime
        try:
            count = int(self._rt.getDeviceCount())
        except Exception as exc:  # CUDARuntimeError: no driver, driver too old, ...
            raise CudaUnavailable(f"the cuda device backend found no usable CUDA driver: "
                                  f"{exc}") from exc
        if count == 0:
            raise CudaUnavailable("the cuda device backend found no GPU (check the driver "
                                  "and CUDA_VISIBLE_DEVICES), or run with THAW_DEVICE=host")
        self._count = count

    @contextlib.contextmanager
    def _translated(self, what: str, device: int) -> Iterator[None]:
        """Turn CuPy's errors into thaw's: OutOfMemory for an allocation failure."""
        oom = getattr(getattr(self._cupy.cuda, "memory", None), "OutOfMemoryError", ())
        try:
            yield
        except ThawError:
            raise
        except oom as exc:
            raise OutOfMemory(f"{what} on cuda{device}: {exc}") from exc
        except self._rt.CUDARuntimeError as exc:
            if getattr(exc, "status", None) == CUDA_ERROR_MEMORY_ALLOCATION:
                raise OutOfMemory(f"{what} on cuda{device}: {exc}") from exc
            raise ThawError(f"{what} on cuda{device} failed: {exc}") from exc

    @contextlib.contextmanager
    def _on(self, device: int, what: str) -> Iterator[None]:
        """Run with `device` current in this thread (CUDA's current device is per
        thread, and the agent calls from a thread pool), translating errors."""
        with self._translated(what, device), self._cupy.cuda.Device(device):
            yield

    def devices(self) -> list[CudaDeviceInfo]:
        infos = []
        with _Nvml() as nvml:
            for index in range(self._count):
                # Without making the device current: on CUDA 12 that creates its context.
                with self._translated("reading device properties", index):
                    props = self._rt.getDeviceProperties(index)
                    bus = str(self._rt.deviceGetPCIBusId(index))
                name = props.get("name", b"")
                name = name.decode() if isinstance(name, bytes) else str(name)
                raw_uuid = props.get("uuid")
                cuda_uuid = (f"GPU-{uuid.UUID(bytes=bytes(raw_uuid))}"
                             if isinstance(raw_uuid, bytes) and len(raw_uuid) == 16 else "")
                total, nvml_uuid = nvml.memory_and_uuid(bus)
                infos.append(CudaDeviceInfo(
                    index=index, name=name, pci_bus_id=bus, uuid=nvml_uuid or cuda_uuid,
                    total_bytes=total or int(props["totalGlobalMem"])))
        return infos

    def mps_active(self) -> bool:
        pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_MPS_PIPE_DIRECTORY)
        return os.path.exists(os.path.join(pipe, "control"))

    def topology(self) -> list[DeviceTopology]:
        with _Nvml() as nvml:
            buses = [str(self._rt.deviceGetPCIBusId(i)) for i in range(self._count)]
            return nvml.topology(buses)

    def h2d_gbps(self, device: int, nbytes: int) -> float:
        rt = self._rt
        with self._on(device, f"measuring host-to-device copies of {nbytes} bytes"):
            host = int(rt.hostAlloc(nbytes, CUDA_HOST_ALLOC_DEFAULT))
            try:
                dst = int(rt.malloc(nbytes))
                try:
                    stream = int(rt.streamCreateWithFlags(CUDA_STREAM_NON_BLOCKING))
                    try:
                        # Touch the source so that its pages exist before timing.
                        ctypes.memset(host, 1, nbytes)
                        best = float("inf")
                        for _ in range(H2D_MEASURE_COPIES):
                            started = time.perf_counter()
                            rt.memcpyAsync(dst, host, nbytes, CUDA_MEMCPY_HOST_TO_DEVICE,
                                           stream)
                            rt.streamSynchronize(stream)
                            best = min(best, time.perf_counter() - started)
                    finally:
                        rt.streamDestroy(stream)
                finally:
                    rt.free(dst)
            finally:
                rt.freeHost(host)
        return nbytes / best / 1e9 if best > 0 else 0.0

    def malloc(self, device: int, nbytes: int) -> int:
        # The runtime's cudaMalloc, not cupy.cuda.alloc: that draws from CuPy's pool, whose
        # blocks share one cudaMalloc, and a block's IPC handle would open all of it. Not
        # cupy.cuda.Memory either: it frees in __dealloc__, where an error cannot surface.
        with self._on(device, f"allocating {nbytes} bytes"):
            return int(self._rt.malloc(nbytes))

    def free(self, device: int, ptr: int) -> None:
        with self._on(device, "freeing a slice"):
            self._rt.free(ptr)

    def ipc_handle(self, device: int, ptr: int) -> bytes:
        with self._on(device, "exporting an IPC handle"):
            return bytes(self._rt.ipcGetMemHandle(ptr))

    def create_stream(self, device: int) -> int:
        with self._on(device, "creating a stream"):
            return int(self._rt.streamCreateWithFlags(CUDA_STREAM_NON_BLOCKING))

    def destroy_stream(self, device: int, stream: int) -> None:
        with self._on(device, "destroying a stream"):
            self._rt.streamDestroy(stream)

    def memset_async(self, device: int, ptr: int, value: int, nbytes: int,
                     stream: int) -> None:
        with self._on(device, "zeroing a slice"):
            self._rt.memsetAsync(ptr, value, nbytes, stream)

    def copy_to_device_async(self, device: int, dst: int, src: memoryview,
                             stream: int) -> None:
        import numpy as np

        # Reads the address without copying; works for the pinned tier's read-only views.
        host = int(np.frombuffer(src, dtype=np.uint8).ctypes.data)
        with self._on(device, f"copying {src.nbytes} bytes to the device"):
            self._rt.memcpyAsync(dst, host, src.nbytes, CUDA_MEMCPY_HOST_TO_DEVICE, stream)

    def synchronize(self, device: int, stream: int) -> None:
        with self._on(device, "waiting for a stream"):
            self._rt.streamSynchronize(stream)


class _Nvml:  # pragma: no cover - needs NVML
    """pynvml for a device's memory and UUID, looked up by PCI bus id (NVML numbers GPUs
    in PCI order, CUDA fastest first, and CUDA_VISIBLE_DEVICES renumbers only CUDA)."""

    def __init__(self) -> None:
        self._pynvml: Any = None

    def __enter__(self) -> _Nvml:
        try:
            import pynvml  # from nvidia-ml-py

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError: fall back to CUDA's figures
            log.warning("NVML unavailable; using CUDA's device memory figures", error=str(exc))
            return self
        self._pynvml = pynvml
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pynvml is not None:
            with contextlib.suppress(Exception):
                self._pynvml.nvmlShutdown()

    def topology(self, buses: list[str]) -> list[DeviceTopology]:
        """For the GPUs at `buses` (CUDA ordinal order): NUMA nodes and pairwise common
        ancestors; [] without NVML."""
        nvml = self._pynvml
        if nvml is None:
            return []
        try:
            handles = [nvml.nvmlDeviceGetHandleByPciBusId(bus) for bus in buses]
        except nvml.NVMLError as exc:
            log.warning("NVML cannot find the GPUs; each taken to have its own PCIe link",
                        error=str(exc))
            return []
        levels: list[list[int | None]] = [[None] * len(buses) for _ in buses]
        for i, first in enumerate(handles):
            levels[i][i] = NVML_TOPOLOGY_INTERNAL
            for j in range(i + 1, len(handles)):
                try:
                    level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(first, handles[j]))
                except nvml.NVMLError as exc:  # e.g. NOT_SUPPORTED in some VMs
                    log.warning("NVML cannot place two GPUs on the PCIe tree",
                                gpus=[buses[i], buses[j]], error=str(exc))
                    continue
                levels[i][j] = levels[j][i] = level
        return [DeviceTopology(self._numa_node(handle, bus), tuple(row))
                for handle, bus, row in zip(handles, buses, levels, strict=True)]

    def _numa_node(self, handle: Any, bus: str) -> int:
        """NVML's answer where the driver has the call, else the kernel's (sysfs); -1
        unknown."""
        nvml = self._pynvml
        getter = getattr(nvml, "nvmlDeviceGetNumaNodeId", None)
        if getter is not None:
            try:
                return int(getter(handle))
            except nvml.NVMLError:
                pass
        try:
            with open(f"/sys/bus/pci/devices/{normal_bus_id(bus)}/numa_node") as handle_file:
                return int(handle_file.read().strip())
        except (OSError, ValueError):
            return -1

    def memory_and_uuid(self, pci_bus_id: str) -> tuple[int, str]:
        """(total bytes, "GPU-…"), or (0, "") when NVML cannot say."""
        nvml = self._pynvml
        if nvml is None:
            return 0, ""
        try:
            handle = nvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
            total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            found = nvml.nvmlDeviceGetUUID(handle)
        except nvml.NVMLError as exc:
            log.warning("NVML cannot describe a GPU", pci_bus_id=pci_bus_id, error=str(exc))
            return 0, ""
        return total, nvml_text(found)
