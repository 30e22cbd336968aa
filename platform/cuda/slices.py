"""A cuda slice and its lifecycle: `CudaSlice` is what callers get (and what the
instance opens), `SliceRecord` is the backend's book entry for it, moved along
`SliceState` only by the edges the lifecycle has, and `DeviceBook` is one GPU's
capacity and the records booked on it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import TypedDict

import structlog

from thaw.core.errors import ThawError
from thaw.platform.cuda.api import CudaDeviceInfo
from thaw.platform.devices import Slice

log = structlog.get_logger()


class SliceNotZeroed(ThawError):
    """A slice's memory could not be zeroed (or, once zeroed, freed): it stays booked and
    is never handed out again."""

    code = "slice_not_zeroed"


class IllegalSliceTransition(ThawError):
    """A slice was asked to move along an edge its lifecycle does not have."""

    code = "illegal_transition"


class CudaSliceDescriptor(TypedDict):
    """What an instance needs to open a cuda slice: the keyword arguments of
    `thaw.platform.cuda_copy.open_slice`, JSON-ready. `device_index` is the GPU's ordinal
    inside the instance (0 once `instance_env` has narrowed CUDA_VISIBLE_DEVICES to it);
    `pci_bus_id` finds it whatever the numbering."""

    ipc_handle: str
    size: int
    device_index: int
    pci_bus_id: str


@dataclass(frozen=True)
class CudaSlice(Slice):
    """A slice on a GPU. `path` is empty: there is no file; the instance opens
    `ipc_handle` instead (`thaw.platform.cuda_copy.open_slice(**descriptor())`)."""

    device_index: int
    """CUDA ordinal in the agent's process."""
    pci_bus_id: str
    """How the instance finds the same GPU whatever its CUDA_VISIBLE_DEVICES."""
    device_uuid: str
    """"GPU-…": for the docker runtime's DeviceRequest and MPS limits."""
    ipc_handle: str
    """The allocation's cudaIpcMemHandle_t, hex."""
    allocated: int
    """Bytes allocated (and zeroed), rounded up to the allocation granularity: `size`,
    or only the part a restore fills (CudaDevices.allocate's `resident`); the rest of
    `size` is booked for the instance's own allocator."""
    compute_percent: int
    """The function's gpu_compute share (0 = none asked)."""
    mps: bool
    """Whether MPS is on, i.e. whether `compute_percent` is enforced."""
    pcie_link: str = ""
    """The PCIe link its fill shares with other GPUs' (thaw.platform.cuda.topology):
    what the activation budget counts it on."""
    numa_node: int = -1
    """The NUMA node of the GPU's PCIe root; -1 unknown."""

    @property
    def instance_device_index(self) -> int:
        """The GPU's CUDA ordinal inside the instance: 0 when CUDA_VISIBLE_DEVICES names
        it alone (by UUID), else the agent's ordinal (the instance then sees the GPUs the
        agent sees, in the same order)."""
        return 0 if self.device_uuid else self.device_index

    def descriptor(self) -> CudaSliceDescriptor:
        """What the instance needs to open the slice."""
        return {"ipc_handle": self.ipc_handle, "size": self.size,
                "device_index": self.instance_device_index, "pci_bus_id": self.pci_bus_id}

    def gpu_ids(self) -> tuple[str, ...]:
        """The slice's GPU, for the sandbox's device request."""
        return (self.device_uuid,) if self.device_uuid else ()

    def instance_env(self) -> dict[str, str]:
        """Environment the instance must have before it first touches CUDA: only its
        slice's GPU visible (by UUID, which no CUDA_DEVICE_ORDER renumbers), and its
        compute share where MPS enforces it. CUDA reads both when it initialises, so a
        forked instance sets them in the child before anything imports CUDA."""
        env = {"CUDA_VISIBLE_DEVICES": self.device_uuid} if self.device_uuid else {}
        if self.mps and self.compute_percent:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(self.compute_percent)
        return env


class SliceState(str, Enum):
    ALLOCATING = "allocating"
    """Booked; device memory being allocated and zeroed. Not yet visible to callers."""
    READY = "ready"
    """Handed out: the instance may map it, restores may fill it."""
    ZEROING = "zeroing"
    """Being scrubbed, then freed."""
    QUARANTINED = "quarantined"
    """Scrubbing or freeing failed: the memory stays booked and is never handed out."""
    FREED = "freed"


_MOVES: dict[SliceState, set[SliceState]] = {
    SliceState.ALLOCATING: {SliceState.READY, SliceState.FREED},
    SliceState.READY: {SliceState.ZEROING},
    SliceState.ZEROING: {SliceState.FREED, SliceState.QUARANTINED},
    # `close` tries once more to scrub what a failed release left behind.
    SliceState.QUARANTINED: {SliceState.ZEROING},
    SliceState.FREED: set(),
}


@dataclass(eq=False)
class SliceRecord:
    """The backend's books on one slice; its state moves only through `move`."""

    id: str
    device: DeviceBook
    size: int
    allocated: int
    booked: int
    compute_percent: int
    state: SliceState = SliceState.ALLOCATING
    ptr: int = 0
    stream: int = 0
    slice: CudaSlice | None = None
    busy: threading.Lock = field(default_factory=threading.Lock)
    """Held by a copy into the slice, and by its scrub: one waits for the other."""

    def move(self, target: SliceState) -> None:
        """Take the lifecycle edge to `target`; IllegalSliceTransition (logged) if the
        lifecycle has no such edge from the current state."""
        if target not in _MOVES[self.state]:
            log.error("illegal slice transition refused", slice=self.id,
                      state=self.state.value, target=target.value)
            raise IllegalSliceTransition(
                f"slice {self.id} cannot move from {self.state.value} to {target.value}")
        self.state = target


@dataclass(eq=False)
class DeviceBook:
    """One GPU's slice capacity (its memory less the reserve) and the slices booked on
    it, whatever their state: a quarantined slice's bytes stay booked."""

    info: CudaDeviceInfo
    id: str
    capacity: int
    link: str = ""
    """Its PCIe link (thaw.platform.cuda.topology)."""
    numa_node: int = -1
    records: dict[str, SliceRecord] = field(default_factory=dict)

    @property
    def booked(self) -> int:
        return sum(r.booked for r in self.records.values())

    @property
    def free(self) -> int:
        return self.capacity - self.booked
