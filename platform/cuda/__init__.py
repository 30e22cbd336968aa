"""The cuda device backend (DESIGN.md §6): one device allocation per slice, handed to the
instance as a CUDA IPC handle, packed best-fit by memory, zeroed before anyone else can
get its memory, and filled from the pinned tier by async copies on several streams.

Modules, each behind the one before it:
- `api`: the CudaApi protocol every CUDA and NVML call goes through, the device info
  it reports and the ABI constants;
- `driver`: `CupyCudaApi`, the real api on CuPy and pynvml (imported lazily, so
  importing this package never needs a GPU);
- `fake`: `InMemoryCudaApi`, which keeps "device memory" in bytearrays and runs stream
  work only when the stream is synchronised, so unit tests catch a free or a return that
  comes before the work it depends on;
- `slices`: `CudaSlice` (what the instance is given) and the slice lifecycle;
- `transfer`: host-to-device copies split across streams;
- `topology`: which GPUs share a PCIe link to host memory (from NVML), what the node's
  activation budget (thaw.platform.activation) counts restores on;
- `allocator`: `CudaDevices`, the DeviceBackend that composes them.

The instance's end (open the handle, view ranges as torch tensors) is
`thaw.platform.cuda_copy`, which imports nothing from thaw so that it can move into the
in-instance runtime; it stays outside this package, whose import pulls in the agent's
side.

Containers. Legacy CUDA IPC (cudaIpcGetMemHandle / cudaIpcOpenMemHandle) only opens in a
process that sees the exporter's PID namespace; from a container with a private one the
open fails ("invalid device context"). So the docker runtime (thaw.platform.docker)
starts cuda instances in the host PID namespace (`pid_mode="host"`, or
`"container:<agent>"` were the agent itself in a container) with the GPU requested by a
DeviceRequest; naming the slice's `device_uuid` there, rather than every GPU, keeps an
instance off GPUs it has no slice on. `open_slice` finds the GPU by PCI bus id, so the
container's own numbering does not matter. The way out of the shared PID namespace is
the VMM API (cuMemCreate exported as a POSIX file descriptor, passed over the instance's
unix socket with SCM_RIGHTS), which CuPy does not wrap, so this backend does not use
it.

MPS. Where an MPS control daemon runs, a function's `gpu_compute` percent is applied by
starting its instance with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=<percent> in its
environment (`CudaSlice.instance_env`), plus CUDA_MPS_PIPE_DIRECTORY if the daemon does
not use the default pipe directory (and, under docker, that directory mounted and
`ipc_mode="host"`). The percentage caps the SMs a client may use; it reserves nothing,
so shares are not packed: their sum on a device may pass 100. Without MPS the share is
kept on the slice as data and not enforced; the node says so in its telemetry
(`compute_shares_enforced`, NodeTelemetry.mps_active) and `thaw node ls` and the
function's status say "gpu_compute not enforced" (docs/gpu-placement.md).

Several GPUs. Every instance sees only its slice's GPU (`CudaSlice.instance_env` sets
CUDA_VISIBLE_DEVICES to its UUID; the descriptor's ordinal is then 0), and slices are
placed behind the PCIe link with the fewest restores in flight (`topology`,
thaw.platform.activation).
"""

from thaw.platform.cuda.allocator import (
    ALLOCATION_GRANULARITY,
    DEFAULT_INSTANCE_OVERHEAD_BYTES,
    DEFAULT_RESERVE_BYTES,
    CudaDevices,
)
from thaw.platform.cuda.api import (
    CUDA_ERROR_MEMORY_ALLOCATION,
    CUDA_IPC_HANDLE_BYTES,
    CUDA_MEMCPY_HOST_TO_DEVICE,
    CUDA_STREAM_NON_BLOCKING,
    DEFAULT_MPS_PIPE_DIRECTORY,
    NVML_TOPOLOGY_HOSTBRIDGE,
    NVML_TOPOLOGY_INTERNAL,
    NVML_TOPOLOGY_MULTIPLE,
    NVML_TOPOLOGY_NODE,
    NVML_TOPOLOGY_SINGLE,
    NVML_TOPOLOGY_SYSTEM,
    CudaApi,
    CudaDeviceInfo,
    CudaUnavailable,
    DeviceTopology,
    GiB,
    MiB,
)
from thaw.platform.cuda.driver import CupyCudaApi
from thaw.platform.cuda.fake import InMemoryCudaApi
from thaw.platform.cuda.slices import (
    CudaSlice,
    CudaSliceDescriptor,
    IllegalSliceTransition,
    SliceNotZeroed,
    SliceState,
)
from thaw.platform.cuda.topology import PcieLink, normal_bus_id, pcie_links
from thaw.platform.cuda.transfer import (
    COPY_SPLIT_ALIGNMENT,
    DEFAULT_COPY_STREAMS,
    CopyOp,
    CopyStats,
    plan_stream_copies,
)

__all__ = [
    "ALLOCATION_GRANULARITY",
    "COPY_SPLIT_ALIGNMENT",
    "CUDA_ERROR_MEMORY_ALLOCATION",
    "CUDA_IPC_HANDLE_BYTES",
    "CUDA_MEMCPY_HOST_TO_DEVICE",
    "CUDA_STREAM_NON_BLOCKING",
    "DEFAULT_COPY_STREAMS",
    "DEFAULT_INSTANCE_OVERHEAD_BYTES",
    "DEFAULT_MPS_PIPE_DIRECTORY",
    "DEFAULT_RESERVE_BYTES",
    "NVML_TOPOLOGY_HOSTBRIDGE",
    "NVML_TOPOLOGY_INTERNAL",
    "NVML_TOPOLOGY_MULTIPLE",
    "NVML_TOPOLOGY_NODE",
    "NVML_TOPOLOGY_SINGLE",
    "NVML_TOPOLOGY_SYSTEM",
    "CopyOp",
    "CopyStats",
    "CudaApi",
    "CudaDeviceInfo",
    "CudaDevices",
    "CudaSlice",
    "CudaSliceDescriptor",
    "CudaUnavailable",
    "CupyCudaApi",
    "DeviceTopology",
    "GiB",
    "IllegalSliceTransition",
    "InMemoryCudaApi",
    "MiB",
    "PcieLink",
    "SliceNotZeroed",
    "SliceState",
    "normal_bus_id",
    "pcie_links",
    "plan_stream_copies",
]
