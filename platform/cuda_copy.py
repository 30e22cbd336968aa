"""The instance's end of a cuda slice, for callers on the agent's side (tests, `thaw
doctor gpu`): the code lives in the in-instance runtime, which opens slices itself."""

from thaw.snapshotter.runtime.device_slice import (
    IPC_HANDLE_BYTES,
    IPC_MEM_LAZY_ENABLE_PEER_ACCESS,
    OpenedSlice,
    SliceOpenError,
    open_slice,
)

__all__ = ["IPC_HANDLE_BYTES", "IPC_MEM_LAZY_ENABLE_PEER_ACCESS", "OpenedSlice",
           "SliceOpenError", "open_slice"]
