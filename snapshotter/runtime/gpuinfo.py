"""What an NVIDIA GPU node is, as snapshot fingerprints record it: the kernel driver's
version, the CUDA driver API version, and the GPU's architecture family.

One parser for the two places that learn these facts: the in-instance runtime at
capture (reads /proc/driver/nvidia/version; torch gives the compute capability) and
the agent (NVML's strings and integers). Both must end up with the same text for the
same driver, so a snapshot's fingerprint compares with a node's by value.

Standard library only at module level (the runtime imports it); pynvml is imported
lazily by the NVML helpers and its absence reads as "cannot say".
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PROC_DRIVER_VERSION = "/proc/driver/nvidia/version"

# "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 ..." or
# "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build ...":
# the proprietary module names the architecture before "Kernel Module", the open one
# after "for". The version is the first dotted number after that.
_NVRM_LINE = re.compile(
    r"NVRM version:\s*NVIDIA UNIX\s+"
    r"(?:(?P<open>Open)\s+Kernel Module\s+for\s+(?P<open_arch>\S+)"
    r"|(?P<arch>\S+)\s+Kernel Module)"
    r"\s+(?P<version>\d+(?:\.\d+){1,3})\b")
# A bare driver version as NVML or nvidia-smi print it: 535.183.01, 570.86.15, 390.157.
_DRIVER_VERSION = re.compile(r"^\s*(\d+(?:\.\d+){1,3})\s*$")
# nvidia-smi's banner: "| NVIDIA-SMI 580.65.06  Driver Version: 580.65.06  CUDA Version: 13.0 |"
_SMI_DRIVER = re.compile(r"Driver Version:\s*(\d+(?:\.\d+){1,3})")
_SMI_CUDA = re.compile(r"CUDA Version:\s*(\d+)\.(\d+)")
_DOTTED_PAIR = re.compile(r"^\s*(\d+)\.(\d+)\s*$")

# Compute capability major -> the architecture family a device arena's kernels and
# layouts are built for. Minor versions of one major share binary compatibility.
ARCHITECTURE_FAMILIES = {
    3: "Kepler", 5: "Maxwell", 6: "Pascal", 7: "Volta/Turing", 8: "Ampere/Ada",
    9: "Hopper", 10: "Blackwell", 11: "Blackwell", 12: "Blackwell",
}


@dataclass(frozen=True)
class KernelDriver:
    """The loaded NVIDIA kernel module, from /proc/driver/nvidia/version."""

    version: str
    """"570.86.15": the same text NVML's nvmlSystemGetDriverVersion gives."""
    open_module: bool
    """The open-source kernel module (nvidia-open) rather than the proprietary one."""
    arch: str
    """CPU architecture the module was built for: "x86_64", "aarch64"."""


@dataclass(frozen=True)
class GpuFacts:
    """A node's first GPU as NVML describes it; empty strings where it cannot say."""

    model: str = ""
    driver: str = ""
    """Kernel driver version, "570.86.15"."""
    cuda: str = ""
    """Highest CUDA version the driver supports, "12.8"."""
    compute_capability: str = ""
    """"9.0"."""


def parse_proc_driver(text: str) -> KernelDriver | None:
    """The kernel module of a /proc/driver/nvidia/version text; None if no NVRM line."""
    match = _NVRM_LINE.search(text)
    if match is None:
        return None
    is_open = match.group("open") is not None
    return KernelDriver(version=match.group("version"), open_module=is_open,
                        arch=match.group("open_arch") if is_open else match.group("arch"))


def driver_version_text(value: str | bytes | None) -> str:
    """A driver version as one text whatever reported it: an NVML string (or bytes,
    from older pynvml), a bare version, or a whole /proc/driver/nvidia/version.
    "" when it holds no driver version."""
    if value is None:
        return ""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    bare = _DRIVER_VERSION.match(text)
    if bare is not None:
        return bare.group(1)
    kernel = parse_proc_driver(text)
    if kernel is not None:
        return kernel.version
    smi = _SMI_DRIVER.search(text)
    return smi.group(1) if smi else ""


def driver_version_tuple(value: str | bytes | None) -> tuple[int, ...] | None:
    """(570, 86, 15) for "570.86.15", for comparing versions numerically ("535.183.01"
    is older than "550.54.15"); None where the text holds no driver version (such as
    the word "for" an older parser recorded from the open module's line)."""
    text = driver_version_text(value)
    if not text:
        return None
    return tuple(int(part) for part in text.split("."))


def driver_at_least(have: str, want: str) -> bool | None:
    """Is driver `have` at least as new as `want`? None where either is unreadable."""
    have_v, want_v = driver_version_tuple(have), driver_version_tuple(want)
    if have_v is None or want_v is None:
        return None
    width = max(len(have_v), len(want_v))
    return have_v + (0,) * (width - len(have_v)) >= want_v + (0,) * (width - len(want_v))


def cuda_version_text(value: int | str | bytes | None) -> str:
    """The CUDA driver API version as "major.minor": from the integer NVML's
    nvmlSystemGetCudaDriverVersion and cudaDriverGetVersion return (12080 -> "12.8",
    13000 -> "13.0"), a dotted text, or nvidia-smi's banner. "" if none is there."""
    if value is None or isinstance(value, bool):
        return ""
    if isinstance(value, int):
        if value <= 0:
            return ""
        return f"{value // 1000}.{(value % 1000) // 10}"
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if text.strip().isdigit():
        return cuda_version_text(int(text))
    match = _DOTTED_PAIR.match(text) or _SMI_CUDA.search(text)
    return f"{int(match.group(1))}.{int(match.group(2))}" if match else ""


def capability_text(capability: tuple[int, int] | Any) -> str:
    """(9, 0) -> "9.0", as torch.cuda.get_device_capability and NVML's
    nvmlDeviceGetCudaComputeCapability give it; "" for anything else."""
    try:
        major, minor = capability
        return f"{int(major)}.{int(minor)}"
    except (TypeError, ValueError):
        return ""


def capability_major(text: str) -> int | None:
    """The architecture family of a compute capability text: "9.0" -> 9."""
    match = _DOTTED_PAIR.match(text or "")
    return int(match.group(1)) if match else None


def family_name(text: str) -> str:
    """"9.0" -> "sm_9x (Hopper)", for messages; the text itself when unknown."""
    major = capability_major(text)
    if major is None:
        return text or "unknown"
    name = ARCHITECTURE_FAMILIES.get(major)
    return f"sm_{major}x ({name})" if name else f"sm_{major}x"


def read_proc_driver(path: str = PROC_DRIVER_VERSION) -> KernelDriver | None:
    """The loaded kernel module; None without the NVIDIA driver (or the file)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_proc_driver(f.read())
    except OSError:
        return None


def _nvml_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def nvml_gpu_facts(index: int = 0, nvml: Any = None) -> GpuFacts:
    """NVML's view of GPU `index` (NVML's numbering) and the driver; `nvml` is the
    pynvml module (imported here when not given). Empty fields where pynvml, NVML or
    the GPU cannot say: a node without them has no GPU facts to compare."""
    if nvml is None:
        try:
            import pynvml  # from nvidia-ml-py
        except ImportError:
            return GpuFacts()
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError: no driver loaded
        return GpuFacts()
    try:
        facts: dict[str, str] = {}
        queries: dict[str, Callable[[], str]] = {
            "driver": lambda: driver_version_text(_nvml_text(nvml.nvmlSystemGetDriverVersion())),
            "cuda": lambda: cuda_version_text(int(nvml.nvmlSystemGetCudaDriverVersion())),
            "model": lambda: _nvml_text(
                nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(index))),
            "compute_capability": lambda: capability_text(
                nvml.nvmlDeviceGetCudaComputeCapability(nvml.nvmlDeviceGetHandleByIndex(index))),
        }
        for name, query in queries.items():
            try:
                facts[name] = query()
            except Exception:  # NVMLError (e.g. NOT_SUPPORTED), an older pynvml
                facts[name] = ""
        return GpuFacts(**facts)
    finally:
        with contextlib.suppress(Exception):  # nothing to do about a failed shutdown
            nvml.nvmlShutdown()


def nvml_compute_capability(index: int = 0) -> str:
    """"9.0" for NVML's GPU `index`; "" without pynvml, NVML or a GPU."""
    return nvml_gpu_facts(index).compute_capability
