"""The checks of `thaw doctor gpu` that need only the GPU, and what this machine has.

- `probe_environment`: CuPy, pynvml, the driver, the GPUs, torch and its CUDA build;
  each one missing is named with how to get it, and without CuPy, a driver or a GPU
  there is no CUDA device to check.
- `check_driver_fingerprint`: the driver version a snapshot's capture records (from
  /proc/driver/nvidia/version) is a version number and the one the node compares it
  with (NVML, through the cuda backend).
- `check_pinned_h2d`: the platform's copy from its pinned tier into a slice against a
  plain copy from page-locked memory (`thaw bench restore --device cuda`).
- `check_slice_ipc`: a slice opened from another process, zeroed when handed out and
  again after its previous tenant wrote it.

ops/doctor_plan.py puts them in order with the platform checks (ops/doctor_platform.py).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from thaw.bench.restore_cuda import CudaBenchParts, run_cuda_restore_bench
from thaw.bench.slice_probe import ProbeRequest, SliceProbe
from thaw.ops.doctor_run import CheckFailed
from thaw.platform.cuda import CudaDevices
from thaw.snapshotter.runtime.gpuinfo import (
    GpuFacts,
    KernelDriver,
    cuda_version_text,
    driver_version_text,
    driver_version_tuple,
    nvml_gpu_facts,
    read_proc_driver,
)

# The bytes the pinned-tier copy moves: the size of the model the platform check
# restores, so the ceiling and that restore compare like with like.
MODEL_BYTES = 1_400_000_000

# A slice for the IPC check: big enough to span many 2 MiB pages, small to zero.
SLICE_CHECK_BYTES = 64 << 20

# Below this share of a plain pinned copy the platform's copy is not running from
# page-locked memory (pageable copies are staged by the driver and reach a third to a
# half of the link): that is a broken node, not a slow one.
MIN_PINNED_RATIO = 0.5

# Each check's own limit, within the run's budget (ops/doctor_run.py DEFAULT_BUDGET_S).
DRIVER_TIMEOUT_S = 30.0
PINNED_TIMEOUT_S = 120.0
SLICE_TIMEOUT_S = 90.0

CHECK_NAMES = ("driver_fingerprint", "pinned_h2d", "slice_ipc", "embed_restore",
               "model_restore", "concurrent_restores", "fork_poisoned")

INSTALL_CUDA = "pip install 'thaw[cuda]'"
TORCH_CUDA_HINT = ("install torch's CUDA build from the PyTorch CUDA wheel index "
                   "(docs/gpu.md, \"Checking a GPU node\")")

Importer = Callable[[str], Any]


@dataclass(frozen=True)
class Environment:
    """What this machine has for the cuda backend; empty strings where it has nothing."""

    cupy: str = ""
    pynvml: str = ""
    driver: str = ""
    """The kernel driver, "570.86.15"."""
    cuda_driver: str = ""
    """The CUDA version the driver supports, "12.8"."""
    gpus: tuple[str, ...] = ()
    """Models CUDA sees (after CUDA_VISIBLE_DEVICES)."""
    torch: str = ""
    torch_cuda: str = ""
    """The CUDA version torch was built for; "" for a CPU-only build."""
    missing: tuple[str, ...] = ()
    """Each thing missing, with how to get it."""
    no_device: str = ""
    """Why there is no CUDA device to check; "" when there is one."""

    def as_json(self) -> dict[str, Any]:
        found = asdict(self)
        found["gpus"] = list(self.gpus)
        found.pop("missing")
        found.pop("no_device")
        return found


def probe_environment(importer: Importer = importlib.import_module,
                      facts: Callable[[], GpuFacts] = nvml_gpu_facts,
                      kernel: Callable[[], KernelDriver | None] = read_proc_driver
                      ) -> Environment:
    """What is here; never raises (a broken library is reported as missing)."""
    missing: list[str] = []
    no_device = ""
    cupy_version = cuda_driver = ""
    gpus: tuple[str, ...] = ()
    try:
        cupy = importer("cupy")
        cupy_version = str(getattr(cupy, "__version__", "?"))
    except ImportError as exc:
        cupy = None
        missing.append(f"CuPy: {INSTALL_CUDA} (cupy-cuda12x) [{exc}]")
        no_device = "CuPy is not installed"
    if cupy is not None:
        runtime = cupy.cuda.runtime
        try:
            count = int(runtime.getDeviceCount())
            cuda_driver = cuda_version_text(int(runtime.driverGetVersion()))
            gpus = tuple(_device_name(runtime, index) for index in range(count))
        except Exception as exc:  # CUDARuntimeError: no driver, too old, no device
            missing.append(f"the NVIDIA driver: CUDA cannot start ({exc})")
            no_device = f"CUDA cannot start: {exc}"
        else:
            if not gpus:
                missing.append("a GPU: the driver sees none (check CUDA_VISIBLE_DEVICES)")
                no_device = "the driver sees no GPU"
    pynvml_version = ""
    try:
        importer("pynvml")
        pynvml_version = _distribution_version("nvidia-ml-py")
    except ImportError:
        missing.append(f"pynvml: {INSTALL_CUDA} (nvidia-ml-py)")
    loaded = kernel()
    driver = loaded.version if loaded is not None else facts().driver
    if not driver and cupy is not None and not no_device:
        missing.append("the NVIDIA kernel driver's version (no /proc/driver/nvidia/version "
                       "and NVML cannot say)")
    torch_version = torch_cuda = ""
    try:
        torch = importer("torch")
        torch_version = str(getattr(torch, "__version__", "?"))
        torch_cuda = str(getattr(getattr(torch, "version", None), "cuda", None) or "")
        if not torch_cuda:
            missing.append(f"torch's CUDA build: torch {torch_version} is CPU-only; "
                           f"{TORCH_CUDA_HINT}")
    except ImportError:
        missing.append(f"torch (the platform checks deploy torch functions): "
                       f"{TORCH_CUDA_HINT}")
    return Environment(cupy=cupy_version, pynvml=pynvml_version, driver=driver,
                       cuda_driver=cuda_driver, gpus=gpus, torch=torch_version,
                       torch_cuda=torch_cuda, missing=tuple(missing), no_device=no_device)


def _device_name(runtime: Any, index: int) -> str:
    name = runtime.getDeviceProperties(index).get("name", b"")
    return name.decode() if isinstance(name, bytes) else str(name)


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# -- a: the driver fingerprint --------------------------------------------------------

def check_driver_fingerprint(kernel: KernelDriver | None, facts: GpuFacts,
                             node_driver: str) -> dict[str, Any]:
    """The driver a capture records (the kernel module's line in /proc) must be a version
    number and the same as the node's (NVML through the backend's gpu_info), or every
    snapshot taken here would be refused (or quarantined) on this very node."""
    figures: dict[str, Any] = {
        "kernel_module": ("open" if kernel.open_module else "proprietary") if kernel else "",
        "arch": kernel.arch if kernel else "",
        "capture_driver": kernel.version if kernel else "",
        "nvml_driver": facts.driver,
        "node_driver": driver_version_text(node_driver),
        "cuda_driver": facts.cuda,
        "gpu": facts.model,
        "compute_capability": facts.compute_capability,
    }
    if kernel is None:
        raise CheckFailed("/proc/driver/nvidia/version has no NVRM line the fingerprint "
                          "parser reads", **figures)
    if driver_version_tuple(kernel.version) is None:
        raise CheckFailed(f"the capture would record driver {kernel.version!r}, not a "
                          "version number", **figures)
    differing = {key: figures[key] for key in ("nvml_driver", "node_driver")
                 if figures[key] != kernel.version}
    if differing:
        raise CheckFailed(f"the capture records driver {kernel.version} but "
                          + ", ".join(f"{k} is {v!r}" for k, v in differing.items()),
                          **figures)
    if not facts.compute_capability:
        raise CheckFailed("NVML gives no compute capability: snapshots cannot record "
                          "the GPU's architecture family", **figures)
    return figures


# -- b: pinned host-to-device ---------------------------------------------------------

def check_pinned_h2d(parts: CudaBenchParts, size_bytes: int = MODEL_BYTES,
                     rounds: int = 5, min_ratio: float = MIN_PINNED_RATIO) -> dict[str, Any]:
    """The platform's copy (pinned tier -> slice, several streams) vs one plain copy from
    page-locked memory, same bytes, same run."""
    result = run_cuda_restore_bench(size_bytes, parts, rounds=rounds)
    figures = {key: result[key] for key in ("bytes", "restore_gbps", "h2d_gbps", "ratio",
                                            "streams", "pinned_memory", "gpu")}
    ratio = float(result["ratio"])
    if ratio < min_ratio:
        raise CheckFailed(f"the platform's copy reaches {ratio:.2f} of a plain pinned copy "
                          f"(under {min_ratio}): its pinned tier is probably not "
                          "page-locked", **figures)
    return figures


# -- c: slice IPC and zeroing ---------------------------------------------------------

def check_slice_ipc(devices: CudaDevices, probe: SliceProbe,
                    size_bytes: int = SLICE_CHECK_BYTES) -> dict[str, Any]:
    """A slice handed out reads as zeros from another process; bytes the agent copies in
    are what that process reads; after it writes the slice and the slice is released,
    a new slice reads as zeros again."""
    figures: dict[str, Any] = {"slice_bytes": size_bytes}
    first = devices.allocate(size_bytes, "doctor")
    try:
        descriptor = first.descriptor()
        figures["device"] = first.device_id
        fresh = probe(descriptor, ProbeRequest(count_nonzero=True))
        figures["ipc_open_s"] = round(fresh.open_s, 3)
        figures["zeroed_on_allocate"] = fresh.nonzero == 0
        pattern = np.random.default_rng(14).integers(1, 256, size_bytes, dtype=np.uint8)
        devices.copy_into_slice(first, [(0, pattern.data)])
        seen = probe(descriptor, ProbeRequest(digest_bytes=size_bytes, fill=0xA5))
        figures["agent_copy_visible"] = (
            seen.sha256 == hashlib.sha256(pattern.data).hexdigest())
    finally:
        devices.release(first.id)
    second = devices.allocate(size_bytes, "doctor")
    try:
        reused = probe(second.descriptor(), ProbeRequest(count_nonzero=True))
        figures["zeroed_after_release"] = reused.nonzero == 0
    finally:
        devices.release(second.id)
    failed = [key for key in ("zeroed_on_allocate", "agent_copy_visible",
                              "zeroed_after_release") if not figures[key]]
    if failed:
        raise CheckFailed("slice check failed: " + ", ".join(failed) + " is false",
                          **figures)
    return figures
