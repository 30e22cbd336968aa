"""The instance's end of a cuda slice: open the IPC handle the agent exported and view
ranges of the slice as torch tensors, without copying (DESIGN.md §6).

The agent fills the slice with the snapshot's device arena (`CudaDevices.
restore_into_slice`) and sends its descriptor with the spawn request; the restore calls
`open_slice` and rebuilds each device storage with `OpenedSlice.storage` (or a typed
view with `OpenedSlice.tensor`) at the offsets the snapshot's storage table gives.

Standard library plus CuPy and torch, imported lazily: this runs inside tenant images.
(`thaw.platform.cuda_copy` re-exports it for the agent's side and tests.)
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

# cudaIpcMemHandle_t is 64 opaque bytes (CUDA_IPC_HANDLE_SIZE in driver_types.h).
IPC_HANDLE_BYTES = 64
# cudaIpcMemLazyEnablePeerAccess: lets the handle open even when the instance's current
# device is another GPU than the slice's.
IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x01


class SliceOpenError(Exception):
    """The slice cannot be opened or viewed in this process (the message says why)."""


class OpenedSlice:
    """A slice mapped into this process. Tensors made from it keep the mapping's Python
    objects alive, but `close` unmaps regardless: call it only when none is in use (an
    instance normally keeps its slice until it exits)."""

    def __init__(self, cupy: Any, device: int, ptr: int, size: int) -> None:
        self.device = device
        """This process's CUDA ordinal of the slice's GPU."""
        self.ptr = ptr
        self.size = size
        self._cupy = cupy
        memory = cupy.cuda.UnownedMemory(ptr, size, self, device_id=device)
        self._array: Any = cupy.ndarray((size,), dtype=cupy.uint8,
                                        memptr=cupy.cuda.MemoryPointer(memory, 0))
        self.closed = False

    def array(self) -> Any:
        """The whole slice as a 1-D CuPy uint8 array (no copy)."""
        self._check_open()
        return self._array

    def tensor(self, offset: int, nbytes: int, dtype: str = "uint8",
               shape: Sequence[int] | None = None,
               stride: Sequence[int] | None = None) -> Any:
        """A torch tensor over slice bytes [offset, offset + nbytes), shared with the
        slice through DLPack. `dtype` is a torch dtype name ("float16"); `shape` and
        `stride` (in elements) default to 1-D contiguous."""
        torch = _import("torch", "viewing a cuda slice as tensors needs torch")
        dlpack = _import("torch.utils.dlpack", "viewing a cuda slice needs torch's DLPack")
        self._check_open()
        if (isinstance(offset, bool) or not isinstance(offset, int)
                or isinstance(nbytes, bool) or not isinstance(nbytes, int)
                or offset < 0 or nbytes < 0 or offset + nbytes > self.size):
            raise SliceOpenError(f"bytes [{offset}, {offset}+{nbytes}) are outside the "
                                 f"{self.size}-byte slice")
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise SliceOpenError(f"{dtype!r} is not a torch dtype")
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        if nbytes % itemsize or offset % itemsize:
            raise SliceOpenError(f"{nbytes} bytes at offset {offset} are not whole, aligned "
                                 f"{dtype} elements")
        if nbytes == 0:
            flat = torch.empty(0, dtype=torch_dtype, device=f"cuda:{self.device}")
        else:
            raw = dlpack.from_dlpack(self._array[offset:offset + nbytes])
            flat = raw if torch_dtype == torch.uint8 else raw.view(torch_dtype)
        if shape is None:
            return flat
        if stride is None:
            return flat.view(tuple(shape))
        return flat.as_strided(tuple(shape), tuple(stride))

    def storage(self, offset: int, nbytes: int) -> Any:
        """A torch UntypedStorage over slice bytes [offset, offset + nbytes): what a
        snapshot's storage table entry becomes."""
        return self.tensor(offset, nbytes).untyped_storage()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with self._cupy.cuda.Device(self.device):
                self._cupy.cuda.runtime.ipcCloseMemHandle(self.ptr)
        except Exception as exc:  # CUDARuntimeError
            raise SliceOpenError(f"closing the slice's IPC mapping failed: {exc}") from exc

    def _check_open(self) -> None:
        if self.closed:
            raise SliceOpenError("the slice was closed")


def open_slice(ipc_handle: str, size: int, device_index: int,
               pci_bus_id: str = "") -> OpenedSlice:
    """Map the slice the agent exported. The GPU is found by `pci_bus_id` when given
    (this process's CUDA_VISIBLE_DEVICES may number GPUs differently from the agent's),
    else by `device_index`."""
    cupy = _import("cupy", "opening a cuda slice needs CuPy in the function's environment "
                           "(pip install cupy-cuda12x)")
    try:
        handle = bytes.fromhex(ipc_handle)
    except (TypeError, ValueError):
        handle = b""
    if len(handle) != IPC_HANDLE_BYTES:
        raise SliceOpenError(f"not a CUDA IPC handle: {ipc_handle!r:.80}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise SliceOpenError(f"slice size must be an integer >= 1, got {size!r}")
    runtime = cupy.cuda.runtime
    try:
        device = runtime.deviceGetByPCIBusId(pci_bus_id) if pci_bus_id else device_index
        with cupy.cuda.Device(device):
            ptr = runtime.ipcOpenMemHandle(handle, IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
    except Exception as exc:  # CUDARuntimeError
        raise SliceOpenError(
            f"cannot open the slice's IPC handle on GPU {pci_bus_id or device_index}: {exc}"
            " (in a container, the instance must share the agent's PID namespace and see "
            "the slice's GPU)") from exc
    return OpenedSlice(cupy, int(device), int(ptr), size)


def _import(name: str, why: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise SliceOpenError(f"{why}: {exc}") from exc
