"""What differs between device backends is asked of the DeviceBackend interface, never of
a backend's name: sandbox needs, slice GPUs and environment, which devices are GPUs for
telemetry, and the fingerprint's GPU model and driver (DESIGN.md §6). The cuda backend
runs on the in-memory CUDA fake; NVML is a fake module injected as `pynvml`."""

from __future__ import annotations

import inspect
import json
import sys
import types
from pathlib import Path

import pytest

from thaw.core.config import AgentConfig
from thaw.core.errors import InvalidArgument
from thaw.platform.cuda import (
    CudaDevices,
    CudaSlice,
    CudaSliceDescriptor,
    CudaUnavailable,
    InMemoryCudaApi,
)
from thaw.platform.cuda_copy import open_slice
from thaw.platform.device_setup import open_devices
from thaw.platform.devices import (
    DeviceBackend,
    DeviceUsage,
    HostDevices,
    SandboxNeeds,
    gpu_info,
)
from thaw.platform.telemetry import Telemetry

MiB = 1024 * 1024


def cuda_backend(*totals: int, mps: bool = False) -> CudaDevices:
    return CudaDevices(InMemoryCudaApi(totals), reserve_bytes=0, instance_overhead_bytes=0,
                       granularity=4096, mps=mps)


class FakeNvml:
    """The pynvml calls the backends make: one GPU named by `name` at 37% busy."""

    def __init__(self, name: object, driver: object, *, utilisation: float = 37.0) -> None:
        class NVMLError(Exception):
            pass

        self.calls: list[str] = []
        module = types.ModuleType("pynvml")
        module.NVMLError = NVMLError  # type: ignore[attr-defined]
        module.nvmlInit = lambda: self.calls.append("init")  # type: ignore[attr-defined]
        module.nvmlShutdown = lambda: self.calls.append("shutdown")  # type: ignore[attr-defined]
        module.nvmlDeviceGetHandleByIndex = lambda index: f"h{index}"  # type: ignore[attr-defined]
        module.nvmlDeviceGetName = lambda handle: name  # type: ignore[attr-defined]
        module.nvmlSystemGetDriverVersion = lambda: driver  # type: ignore[attr-defined]
        module.nvmlDeviceGetUtilizationRates = (  # type: ignore[attr-defined]
            lambda handle: types.SimpleNamespace(gpu=utilisation))
        self.module = module


def test_host_slices_need_nothing_of_a_sandbox(tmp_path: Path) -> None:
    devices = HostDevices([16 * MiB], tmp_path)
    backend: DeviceBackend = devices
    assert backend.sandbox_needs() == SandboxNeeds(gpus=False, host_pid_namespace=False)
    assert backend.gpu_info() == ("", "")
    sl = backend.allocate(MiB, "fn")
    assert sl.gpu_ids() == () and sl.instance_env() == {}
    assert [u.gpu for u in backend.usage()] == [False]


def test_cuda_slices_ask_for_their_gpu_and_the_agents_pid_namespace() -> None:
    devices = cuda_backend(64 * MiB, 64 * MiB, mps=True)
    backend: DeviceBackend = devices
    assert backend.sandbox_needs() == SandboxNeeds(gpus=True, host_pid_namespace=True)
    sl = devices.allocate(MiB, "fn", compute_percent=30)
    assert isinstance(sl, CudaSlice)
    assert sl.gpu_ids() == (f"GPU-00000000-0000-0000-0000-{sl.device_index:012x}",)
    assert sl.instance_env() == {"CUDA_VISIBLE_DEVICES": sl.device_uuid,
                                 "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}
    assert [(u.kind, u.gpu) for u in backend.usage()] == [("cuda", True), ("cuda", True)]
    devices.close()


def test_a_cuda_slice_without_a_known_uuid_requests_no_gpu_by_name() -> None:
    sl = CudaSlice(id="s", device_id="cuda0", size=1, path="", device_index=0,
                   pci_bus_id="0000:01:00.0", device_uuid="", ipc_handle="00" * 64,
                   allocated=4096, compute_percent=0, mps=False)
    assert sl.gpu_ids() == ()
    assert sl.instance_env() == {}


def test_telemetry_asks_nvml_about_the_devices_that_say_they_are_gpus(
        monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml("Fake GPU", "550.54", utilisation=37.0)
    monkeypatch.setitem(sys.modules, "pynvml", nvml.module)
    sample = Telemetry().sample([], [
        DeviceUsage("gpu0", "accelerator", 8 << 30, 1 << 30, gpu=True),
        DeviceUsage("cuda9", "cuda", 8 << 30, 0),  # named like a GPU, but says it is not
        DeviceUsage("host0", "host", 4 << 30, 0)])
    assert [(d.id, d.kind, d.utilization_percent) for d in sample.devices] == [
        ("gpu0", "accelerator", 37.0), ("cuda9", "cuda", None), ("host0", "host", None)]


def test_telemetry_without_nvml_reports_no_utilisation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    sample = Telemetry().sample([], cuda_backend(64 * MiB).usage())
    assert [(d.id, d.utilization_percent) for d in sample.devices] == [("cuda0", None)]


@pytest.mark.parametrize(("name", "driver"), [(b"NVIDIA H100 80GB HBM3", b"550.54.15"),
                                              ("NVIDIA H100 80GB HBM3", "550.54.15")])
def test_the_cuda_backend_fingerprints_nvmls_first_gpu_and_driver(
        monkeypatch: pytest.MonkeyPatch, name: object, driver: object) -> None:
    nvml = FakeNvml(name, driver)
    monkeypatch.setitem(sys.modules, "pynvml", nvml.module)
    expected = ("NVIDIA H100 80GB HBM3", "550.54.15")
    assert cuda_backend(64 * MiB).gpu_info() == expected
    assert gpu_info() == expected  # the module-level function says the same
    assert nvml.calls == ["init", "shutdown", "init", "shutdown"]


def test_no_nvml_means_an_empty_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert cuda_backend(64 * MiB).gpu_info() == ("", "")
    assert gpu_info() == ("", "")


def test_an_nvml_error_means_an_empty_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml("x", "y")

    def no_gpu(index: int) -> str:
        raise nvml.module.NVMLError("no GPU")

    nvml.module.nvmlDeviceGetHandleByIndex = no_gpu  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml.module)
    assert cuda_backend(64 * MiB).gpu_info() == ("", "")
    assert nvml.calls == ["init", "shutdown"]  # shut down even when a call failed


class Settings:
    """The agent settings open_devices reads, as plain attributes."""

    def __init__(self, device: str, *, host_devices: str = "2x8MiB", cuda_mps: str = "auto"
                 ) -> None:
        self.device = device
        self.host_devices = host_devices
        self.cuda_reserve = "1GiB"
        self.cuda_instance_overhead = "512MiB"
        self.cuda_mps = cuda_mps


def test_open_devices_builds_the_host_backend_with_the_default_pinned_memory(
        tmp_path: Path) -> None:
    devices, allocator = open_devices(Settings("host", host_devices="2x8MiB,4MiB"), tmp_path)
    assert isinstance(devices, HostDevices) and allocator is None
    assert [(u.id, u.capacity) for u in devices.usage()] == [
        ("host0", 8 * MiB), ("host1", 8 * MiB), ("host2", 4 * MiB)]


def test_open_devices_reads_the_agents_own_settings(tmp_path: Path) -> None:
    devices, allocator = open_devices(AgentConfig(host_devices="1x16MiB"), tmp_path)
    assert isinstance(devices, HostDevices) and allocator is None
    assert [u.capacity for u in devices.usage()] == [16 * MiB]


def test_open_devices_without_cupy_says_the_cuda_backend_cannot_run(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    with pytest.raises(CudaUnavailable, match="THAW_DEVICE=host"):
        open_devices(Settings("cuda"), tmp_path)


@pytest.mark.parametrize(("mode", "asked"), [("auto", None), ("on", True), ("off", False)])
def test_the_cuda_settings_size_the_backend(monkeypatch: pytest.MonkeyPatch, mode: str,
                                            asked: bool | None) -> None:
    seen: dict[str, object] = {}

    def fake_init(self: CudaDevices, api: object = None, **options: object) -> None:
        seen.update(options)

    monkeypatch.setattr(CudaDevices, "__init__", fake_init)
    CudaDevices.from_settings(Settings("cuda", cuda_mps=mode))
    assert seen == {"reserve_bytes": 1024 * MiB, "instance_overhead_bytes": 512 * MiB,
                    "mps": asked}


def test_an_unknown_mps_mode_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="cuda_mps"):
        CudaDevices.from_settings(Settings("cuda", cuda_mps="sometimes"))


def test_the_descriptor_type_names_exactly_what_the_instance_side_opens() -> None:
    parameters = inspect.signature(open_slice).parameters
    assert list(CudaSliceDescriptor.__annotations__) == list(parameters)
    sl = cuda_backend(64 * MiB).allocate(MiB, "fn")
    assert isinstance(sl, CudaSlice)
    descriptor = sl.descriptor()
    assert json.loads(json.dumps(descriptor)) == descriptor  # JSON-ready
    assert {key: type(value) for key, value in descriptor.items()} == {
        "ipc_handle": str, "size": int, "device_index": int, "pci_bus_id": str}
