"""The driver fingerprint parser (snapshotter/runtime/gpuinfo.py) against version
strings as the NVIDIA driver, NVML and nvidia-smi print them: proprietary and open
kernel modules on x86_64 and aarch64, drivers 535 to 580, CUDA 12.x and 13.x."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from thaw.snapshotter.runtime import gpuinfo
from thaw.snapshotter.runtime.gpuinfo import (
    GpuFacts,
    KernelDriver,
    capability_major,
    capability_text,
    cuda_version_text,
    driver_at_least,
    driver_version_text,
    driver_version_tuple,
    family_name,
    nvml_gpu_facts,
    parse_proc_driver,
    read_proc_driver,
)

GCC = "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04) \n"

# /proc/driver/nvidia/version as recorded on real machines (the first line is what
# matters; the GCC line follows it).
PROC_VERSIONS = [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 "
     "UTC 2024\n" + GCC, KernelDriver("535.183.01", False, "x86_64")),
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 "
     "UTC 2024\n" + GCC, KernelDriver("550.54.15", False, "x86_64")),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.90.07  Release Build  "
     "(dvs-builder@U16-T02-35-3)  Fri May 31 09:30:47 UTC 2024\n" + GCC,
     KernelDriver("550.90.07", True, "x86_64")),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  565.57.01  Release Build  "
     "(dvs-builder@U16-I3-D08-1-1)  Thu Oct 10 12:29:05 UTC 2024\n" + GCC,
     KernelDriver("565.57.01", True, "x86_64")),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  "
     "(dvs-builder@U16-I3-B03-4-3)  Thu Jan 23 00:52:48 UTC 2025\n" + GCC,
     KernelDriver("570.86.15", True, "x86_64")),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
     "(dvs-builder@U22-I3-AE18-23-3)  Wed Jul 23 02:58:39 UTC 2025\n" + GCC,
     KernelDriver("580.65.06", True, "x86_64")),
    ("NVRM version: NVIDIA UNIX aarch64 Kernel Module  550.127.05  Tue Oct  8 03:07:55 "
     "UTC 2024\nGCC version:  gcc version 11.4.0 (Ubuntu 11.4.0-1ubuntu1~22.04) \n",
     KernelDriver("550.127.05", False, "aarch64")),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  570.124.06  Release Build  "
     "(dvs-builder@U16-I3-B13-3-1)  Wed Feb 26 01:21:33 UTC 2025\n",
     KernelDriver("570.124.06", True, "aarch64")),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  580.82.07  Release Build  "
     "(dvs-builder@U22-I3-AE18-09-1)  Wed Sep 10 10:41:38 UTC 2025\n",
     KernelDriver("580.82.07", True, "aarch64")),
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  390.157  Wed Oct 12 09:19:07 UTC 2022\n",
     KernelDriver("390.157", False, "x86_64")),
]


@pytest.mark.parametrize(("text", "expected"), PROC_VERSIONS)
def test_proc_driver_version_of_either_kernel_module(text: str, expected: KernelDriver) -> None:
    assert parse_proc_driver(text) == expected
    assert driver_version_text(text) == expected.version


def test_the_open_module_is_not_read_as_the_word_for() -> None:
    text = PROC_VERSIONS[4][0]
    assert "for" not in driver_version_text(text)
    assert driver_version_tuple(text) == (570, 86, 15)


@pytest.mark.parametrize("text", ["", "no NVIDIA here\n",
                                  "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64"])
def test_text_without_a_driver_line_has_no_version(text: str) -> None:
    assert parse_proc_driver(text) is None
    assert driver_version_text(text) == ""
    assert driver_version_tuple(text) is None


@pytest.mark.parametrize(("value", "expected"), [
    ("535.183.01", "535.183.01"), (b"550.54.15", "550.54.15"), ("565.57.01\n", "565.57.01"),
    ("570.86.15", "570.86.15"), ("580.65.06", "580.65.06"), (None, ""), ("for", ""),
    # nvidia-smi's banner
    ("| NVIDIA-SMI 570.86.15              Driver Version: 570.86.15      CUDA Version: "
     "12.8     |", "570.86.15"),
])
def test_nvml_and_nvidia_smi_driver_versions(value: str | bytes | None, expected: str) -> None:
    assert driver_version_text(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (12020, "12.2"), (12040, "12.4"), (12070, "12.7"), (12080, "12.8"), (12090, "12.9"),
    (13000, "13.0"), (13010, "13.1"), ("12080", "12.8"), ("12.8", "12.8"), (b"13.0", "13.0"),
    ("| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: 13.0     |", "13.0"),
    ("| NVIDIA-SMI 535.183.01  Driver Version: 535.183.01  CUDA Version: 12.2     |", "12.2"),
    (0, ""), (None, ""), ("", ""), ("unknown", ""),
])
def test_cuda_driver_versions(value: int | str | bytes | None, expected: str) -> None:
    assert cuda_version_text(value) == expected


@pytest.mark.parametrize(("have", "want", "expected"), [
    ("570.86.15", "535.183.01", True),
    ("550.54.15", "535.183.01", True),   # numerically, not as text: 550 > 535
    ("535.183.01", "550.54.15", False),
    ("550.127.05", "550.54.15", True),   # 127 > 54 though "1" < "5"
    ("550.54.15", "550.54.15", True),
    ("580.65.06", "580.65", True),
    ("580.65", "580.65.06", False),
    ("570.86.15", "for", None),          # what an older parser recorded: unreadable
    ("", "570.86.15", None),
])
def test_driver_versions_compare_numerically(have: str, want: str,
                                             expected: bool | None) -> None:
    assert driver_at_least(have, want) is expected


def test_compute_capability_and_families() -> None:
    assert capability_text((9, 0)) == "9.0"
    assert capability_text((8, 6)) == "8.6"
    assert capability_text(None) == ""
    assert capability_major("9.0") == 9 and capability_major("12.0") == 12
    assert capability_major("") is None and capability_major("Hopper") is None
    assert family_name("9.0") == "sm_9x (Hopper)"
    assert family_name("8.9") == "sm_8x (Ampere/Ada)"
    assert family_name("") == "unknown"


def test_reading_the_proc_file(tmp_path: Path) -> None:
    path = tmp_path / "version"
    path.write_text(PROC_VERSIONS[5][0])
    assert read_proc_driver(str(path)) == KernelDriver("580.65.06", True, "x86_64")
    assert read_proc_driver(str(path) + ".missing") is None


class FakeNvml:
    """pynvml's calls as the NVML of an H100 node with driver 570 answers them."""

    class NVMLError(Exception):
        pass

    def __init__(self, *, fail_init: bool = False, capability_fails: bool = False) -> None:
        self.fail_init = fail_init
        self.capability_fails = capability_fails
        self.shutdown = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"570.86.15"  # older pynvml answers bytes

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12080

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        if self.capability_fails:
            raise self.NVMLError("Not Supported")
        return (9, 0)


def test_nvml_facts_of_a_gpu_node() -> None:
    nvml = FakeNvml()
    assert nvml_gpu_facts(0, nvml) == GpuFacts(
        model="NVIDIA H100 80GB HBM3", driver="570.86.15", cuda="12.8",
        compute_capability="9.0")
    assert nvml.shutdown


def test_nvml_facts_say_nothing_they_cannot_know() -> None:
    assert nvml_gpu_facts(0, FakeNvml(fail_init=True)) == GpuFacts()
    facts = nvml_gpu_facts(0, FakeNvml(capability_fails=True))
    assert facts.compute_capability == "" and facts.driver == "570.86.15"


def test_the_module_imports_only_the_standard_library() -> None:
    import sys
    source = Path(gpuinfo.__file__).read_text(encoding="utf-8")
    top_level = [line for line in source.splitlines()
                 if line.startswith(("import ", "from "))]
    for line in top_level:
        name = line.split()[1].split(".")[0]
        assert name == "__future__" or name in sys.stdlib_module_names, line


# The module, not the function the package re-exports under the same name.
capture = importlib.import_module("thaw.snapshotter.runtime.capture")


class FakeCuda:
    def get_device_name(self) -> str:
        return "NVIDIA H100 80GB HBM3"

    def get_device_capability(self) -> tuple[int, int]:
        return (9, 0)


class FakeTorch:
    __version__ = "2.13.0+cu128"
    cuda = FakeCuda()


def test_capture_records_the_open_modules_version_not_the_word_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    open_module = PROC_VERSIONS[4][0]
    monkeypatch.setattr(capture, "read_proc_driver", lambda: parse_proc_driver(open_module))
    monkeypatch.setitem(__import__("sys").modules, "torch", FakeTorch())
    fp = capture._fingerprint(True, "3")
    assert (fp.device_type, fp.gpu_model, fp.driver, fp.torch) == (
        "cuda", "NVIDIA H100 80GB HBM3", "570.86.15", "2.13.0+cu128")
    # The family, where snapshot.json's schema holds it.
    if "compute_capability" in {f.name for f in dataclasses.fields(fp)}:
        assert fp.compute_capability == "9.0"  # type: ignore[attr-defined]
    # A snapshot that holds no CUDA memory records no GPU facts.
    host = capture._fingerprint(False, "3")
    assert (host.device_type, host.gpu_model, host.driver) == ("host", None, None)


def test_capture_falls_back_to_nvml_without_the_proc_file(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "read_proc_driver", lambda: None)
    monkeypatch.setattr(capture, "nvml_gpu_facts", lambda: nvml_gpu_facts(0, FakeNvml()))
    assert capture._nvidia_driver_version() == "570.86.15"
    monkeypatch.setattr(capture, "nvml_gpu_facts", lambda: GpuFacts())
    assert capture._nvidia_driver_version() is None
