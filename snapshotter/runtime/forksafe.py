"""Whether this process initialised CUDA, so a template knows if it may fork.

CUDA state does not survive fork: once a process has initialised the driver (`cuInit`,
which any runtime call such as `cudaGetDeviceCount` makes), its forked children cannot
use CUDA at all. A template that pre-imported a module doing so at import (a module-level
`torch.cuda.get_device_name()`, `cupy.cuda.is_available()`) must therefore start its
instances as fresh interpreters instead of forking them.

Three checks, none of which initialises anything:
- torch, if imported: `torch.cuda.is_initialized()`.
- CuPy, if imported: `cupy.cuda.is_available()` caches its answer in
  `cupy.cuda._available` after asking the runtime for the device count. CuPy keeps its
  per-thread context state in Cython-private variables, so every other CuPy call is
  caught by the driver check below.
- the driver, if `libcuda` is already loaded (never loaded here): every driver API
  function answers CUDA_ERROR_NOT_INITIALIZED until `cuInit` ran, so a successful
  `cuDeviceGetCount` proves someone initialised it.

Standard library only: the in-instance runtime imports nothing else.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

# Templates run with this set (thaw.platform.launch.template_spec, and run_template for
# templates started by hand): torch.cuda.is_available() and device_count() then ask
# NVML instead of initialising the CUDA driver.
NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"

# The driver's soname: dlopen(RTLD_NOLOAD) matches it against every loaded library's
# soname, so it finds the driver whichever file name loaded it. A failed look-up costs
# tens of microseconds and runs once per pre-imported module: one name only.
CUDA_DRIVER_LIBRARIES = ("libcuda.so.1",)
CUDA_SUCCESS = 0

Loader = Callable[[str], Any]
"""Opens a shared library only if it is already loaded; raises OSError otherwise."""


def _load_if_loaded(name: str) -> Any:
    # RTLD_NOLOAD: a handle to an already loaded library, never a load.
    return ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)


def torch_initialised() -> bool:
    """torch created its CUDA state (torch.cuda.is_initialized())."""
    torch = sys.modules.get("torch")
    is_initialized = getattr(getattr(torch, "cuda", None), "is_initialized", None)
    if not callable(is_initialized):
        return False
    try:
        return bool(is_initialized())
    except Exception:  # a half-imported torch: no CUDA state to speak of
        return False


def cupy_initialised() -> bool:
    """CuPy found a device through the CUDA runtime (cupy.cuda.is_available() ran)."""
    cupy = sys.modules.get("cupy")
    return getattr(getattr(cupy, "cuda", None), "_available", None) is True


class DriverProbe:
    """Asks an already loaded CUDA driver whether it was initialised."""

    def __init__(self, libraries: Sequence[str] = CUDA_DRIVER_LIBRARIES,
                 loader: Loader = _load_if_loaded) -> None:
        self._libraries = tuple(libraries)
        self._loader = loader
        self._driver: Any = None

    def _loaded_driver(self) -> Any:
        if self._driver is None:
            for name in self._libraries:
                try:
                    self._driver = self._loader(name)
                    break
                except OSError:
                    continue
        return self._driver

    def initialised(self) -> bool:
        driver = self._loaded_driver()
        if driver is None:
            return False
        count = ctypes.c_int(0)
        try:
            return int(driver.cuDeviceGetCount(ctypes.byref(count))) == CUDA_SUCCESS
        except (AttributeError, OSError):  # not a CUDA driver after all
            return False


Check = tuple[str, Callable[[], bool]]


def default_checks(driver: DriverProbe | None = None) -> list[Check]:
    """torch, CuPy, then the driver: the first that answers names the culprit."""
    probe = driver or DriverProbe()
    return [("torch", torch_initialised), ("CuPy", cupy_initialised),
            ("the CUDA driver", probe.initialised)]


class CudaInitWatch:
    """Run after each module a template imports: remembers the first import after
    which CUDA was initialised, and by whom."""

    def __init__(self, checks: Sequence[Check] | None = None) -> None:
        self._checks = list(checks) if checks is not None else default_checks()
        self.reason: str | None = None

    def _culprit(self) -> str | None:
        for who, initialised in self._checks:
            if initialised():
                return who
        return None

    def after_import(self, module: str) -> None:
        """Check once `module` is imported; a no-op once a reason is known."""
        if self.reason is not None:
            return
        who = self._culprit()
        if who is not None:
            self.reason = f"{who} initialised CUDA at import (module {module})"

    def verdict(self) -> str | None:
        """None when forking is safe, else why not (a last check covers imports that
        ran outside `after_import`)."""
        if self.reason is None:
            who = self._culprit()
            if who is not None:
                self.reason = f"{who} initialised CUDA while the function's modules were imported"
        return self.reason
