"""The seam between the cuda device backend and the CUDA runtime and NVML: every call
the backend makes goes through `CudaApi`, on an explicit device. `CupyCudaApi`
(driver.py) is the real one; `InMemoryCudaApi` (fake.py) keeps device memory in
bytearrays for unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from thaw.core.errors import ThawError

MiB = 1024 * 1024
GiB = 1024 * MiB

# Values from cuda_runtime_api.h / driver_types.h; they are ABI and never change.
CUDA_MEMCPY_HOST_TO_DEVICE = 1
CUDA_STREAM_NON_BLOCKING = 0x01
CUDA_ERROR_MEMORY_ALLOCATION = 2
CUDA_IPC_HANDLE_BYTES = 64

# Where nvidia-cuda-mps-control listens unless CUDA_MPS_PIPE_DIRECTORY says otherwise.
DEFAULT_MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"

# nvmlGpuTopologyLevel_t (nvml.h), ABI like the values above: the closest common ancestor
# of two GPUs on the PCIe tree, nearer first. Up to MULTIPLE the path between them stays
# below the host bridge, i.e. they sit behind the same PCIe switch (or board) and share
# its uplink; from HOSTBRIDGE on each has a root port of its own.
NVML_TOPOLOGY_INTERNAL = 0
NVML_TOPOLOGY_SINGLE = 10
NVML_TOPOLOGY_MULTIPLE = 20
NVML_TOPOLOGY_HOSTBRIDGE = 30
NVML_TOPOLOGY_NODE = 40
NVML_TOPOLOGY_SYSTEM = 50


class CudaUnavailable(ThawError):
    """CuPy, the CUDA driver or a GPU is missing: the cuda device backend cannot run."""

    code = "cuda_unavailable"


@dataclass(frozen=True, slots=True)
class CudaDeviceInfo:
    """One GPU as the agent's CUDA runtime numbers it."""

    index: int
    """CUDA ordinal in the agent's process (after CUDA_VISIBLE_DEVICES)."""
    name: str
    """Model, e.g. "NVIDIA A100-SXM4-40GB"."""
    pci_bus_id: str
    """"0000:3b:00.0": the same GPU whatever a process's CUDA_VISIBLE_DEVICES says."""
    uuid: str
    """"GPU-…": what docker DeviceRequests and MPS limits name a GPU by."""
    total_bytes: int
    """Device memory in bytes (NVML's figure when NVML answers)."""


@dataclass(frozen=True, slots=True)
class DeviceTopology:
    """Where one GPU sits on the machine's PCIe tree, as NVML reports it."""

    numa_node: int
    """The NUMA node its PCIe root is attached to; -1 where unknown."""
    levels: tuple[int | None, ...]
    """The NVML_TOPOLOGY_* level of its common ancestor with each GPU, in CUDA ordinal
    order (its own entry NVML_TOPOLOGY_INTERNAL); None where NVML cannot say."""


class CudaApi(Protocol):
    """The CUDA runtime and NVML calls the backend makes, each on an explicit device.

    Implementations translate their library's errors: OutOfMemory when the device has no
    room, ThawError (never a CuPy or NVML exception) for anything else.
    """

    def devices(self) -> list[CudaDeviceInfo]:
        """Every GPU visible to this process, in CUDA ordinal order."""
        ...

    def mps_active(self) -> bool:
        """Whether an MPS control daemon is serving this machine."""
        ...

    def topology(self) -> list[DeviceTopology]:
        """Each GPU's NUMA node and PCIe distances, in CUDA ordinal order; an empty list
        when NVML is not there to ask (every GPU is then taken to have a link of its
        own)."""
        ...

    def h2d_gbps(self, device: int, nbytes: int) -> float:
        """Measure host-to-device copies of `nbytes` from page-locked host memory to
        `device`: gigabytes (1e9 bytes) per second, the best of a few copies."""
        ...

    def malloc(self, device: int, nbytes: int) -> int:
        """A new device allocation of its own (never a block of a shared pool)."""
        ...

    def free(self, device: int, ptr: int) -> None: ...

    def ipc_handle(self, device: int, ptr: int) -> bytes:
        """The 64-byte IPC handle of the allocation that starts at `ptr`."""
        ...

    def create_stream(self, device: int) -> int:
        """A non-blocking stream: it never waits on, or for, the legacy default stream."""
        ...

    def destroy_stream(self, device: int, stream: int) -> None: ...

    def memset_async(self, device: int, ptr: int, value: int, nbytes: int,
                     stream: int) -> None: ...

    def copy_to_device_async(self, device: int, dst: int, src: memoryview,
                             stream: int) -> None:
        """Queue a copy of `src` (host bytes) to `dst`; `src` must stay alive and
        unchanged until `stream` is synchronised."""
        ...

    def synchronize(self, device: int, stream: int) -> None:
        """Wait for everything queued on `stream`; raises if any of it failed."""
        ...
