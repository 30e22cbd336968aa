"""Fork safety checks (snapshotter/runtime/forksafe.py) against fake torch, CuPy and
CUDA driver modules: a template must learn whether its imports initialised CUDA, and
which module did it, without initialising anything itself."""

from __future__ import annotations

import ctypes
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from thaw.snapshotter.runtime.forksafe import (
    CUDA_SUCCESS,
    CudaInitWatch,
    DriverProbe,
    cupy_initialised,
    default_checks,
    torch_initialised,
)

CUDA_ERROR_NOT_INITIALIZED = 3


def fake_torch(initialised: Callable[[], bool]) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(is_initialized=initialised)  # type: ignore[attr-defined]
    return torch


def fake_cupy(available: bool | None) -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(_available=available)  # type: ignore[attr-defined]
    return cupy


class FakeDriver:
    """libcuda as far as cuDeviceGetCount goes: NOT_INITIALIZED until cuInit."""

    def __init__(self) -> None:
        self.initialised = False
        self.calls = 0

    def cuInit(self, flags: int) -> int:  # noqa: N802 (the driver's name)
        self.initialised = True
        return CUDA_SUCCESS

    def cuDeviceGetCount(self, count: Any) -> int:  # noqa: N802
        self.calls += 1
        if not self.initialised:
            return CUDA_ERROR_NOT_INITIALIZED
        ctypes.cast(count, ctypes.POINTER(ctypes.c_int))[0] = 2
        return CUDA_SUCCESS


class Loader:
    """Opens only libraries marked as loaded, like dlopen(RTLD_NOLOAD)."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] = {}
        self.asked: list[str] = []

    def __call__(self, name: str) -> Any:
        self.asked.append(name)
        if name not in self.loaded:
            raise OSError(f"{name}: cannot open shared object file")
        return self.loaded[name]


@pytest.fixture
def no_gpu_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.delitem(sys.modules, "cupy", raising=False)


@pytest.mark.usefixtures("no_gpu_modules")
def test_torch_counts_only_once_imported_and_initialised(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    assert not torch_initialised()
    state = {"on": False}
    monkeypatch.setitem(sys.modules, "torch", fake_torch(lambda: state["on"]))
    assert not torch_initialised()
    state["on"] = True
    assert torch_initialised()


@pytest.mark.usefixtures("no_gpu_modules")
def test_a_half_imported_torch_is_not_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # no .cuda yet
    assert not torch_initialised()

    def broken() -> bool:
        raise RuntimeError("torch._C not loaded")

    monkeypatch.setitem(sys.modules, "torch", fake_torch(broken))
    assert not torch_initialised()


@pytest.mark.usefixtures("no_gpu_modules")
@pytest.mark.parametrize(("available", "initialised"),
                         [(None, False), (False, False), (True, True)])
def test_cupy_counts_once_it_found_a_device(monkeypatch: pytest.MonkeyPatch,
                                            available: bool | None, initialised: bool) -> None:
    assert not cupy_initialised()
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(available))
    assert cupy_initialised() is initialised


def test_the_driver_probe_never_loads_and_answers_after_cuinit() -> None:
    loader, driver = Loader(), FakeDriver()
    probe = DriverProbe(("libcuda.so.1", "libcuda.so"), loader)
    assert not probe.initialised()  # not loaded at all
    assert loader.asked == ["libcuda.so.1", "libcuda.so"]
    loader.loaded["libcuda.so"] = driver  # some library loaded it under its plain name
    assert not probe.initialised()  # loaded, never initialised
    assert driver.calls == 1 and not driver.initialised  # asking did not initialise it
    driver.cuInit(0)
    assert probe.initialised()


def test_the_driver_probe_tolerates_a_library_without_the_call() -> None:
    loader = Loader()
    loader.loaded["libcuda.so.1"] = types.SimpleNamespace()
    assert not DriverProbe(("libcuda.so.1",), loader).initialised()


def test_the_real_driver_probe_never_loads_the_driver() -> None:
    def driver_mapped() -> bool:
        return "libcuda.so" in Path("/proc/self/maps").read_text()

    before = driver_mapped()
    answer = DriverProbe().initialised()
    assert driver_mapped() == before
    if not before:
        assert answer is False


def test_the_watch_names_the_first_module_that_initialised_cuda() -> None:
    state = {"torch": False, "driver": False}
    watch = CudaInitWatch([("torch", lambda: state["torch"]),
                           ("the CUDA driver", lambda: state["driver"])])
    watch.after_import("json")
    assert watch.reason is None
    state["driver"] = True
    watch.after_import("models.loader")
    state["torch"] = True
    watch.after_import("models.other")
    assert watch.reason == "the CUDA driver initialised CUDA at import (module models.loader)"
    assert watch.verdict() == watch.reason


def test_the_watch_prefers_the_library_over_the_driver_for_one_import() -> None:
    watch = CudaInitWatch([("torch", lambda: True), ("the CUDA driver", lambda: True)])
    watch.after_import("app")
    assert watch.verdict() == "torch initialised CUDA at import (module app)"


def test_the_verdict_catches_what_no_single_import_was_seen_doing() -> None:
    state = {"on": False}
    watch = CudaInitWatch([("CuPy", lambda: state["on"])])
    watch.after_import("app")
    assert watch.verdict() is None
    state["on"] = True
    assert watch.verdict() == "CuPy initialised CUDA while the function's modules were imported"


@pytest.mark.usefixtures("no_gpu_modules")
def test_default_checks_see_fake_modules_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    loader, driver = Loader(), FakeDriver()
    loader.loaded["libcuda.so.1"] = driver
    checks = default_checks(DriverProbe(("libcuda.so.1",), loader))
    assert [who for who, _ in checks] == ["torch", "CuPy", "the CUDA driver"]
    watch = CudaInitWatch(checks)
    watch.after_import("plain")
    assert watch.reason is None
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(True))
    driver.cuInit(0)  # cupy.cuda.is_available() initialises the driver too
    watch.after_import("uses_cupy")
    assert watch.reason == "CuPy initialised CUDA at import (module uses_cupy)"
