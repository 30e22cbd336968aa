"""The checks of `thaw doctor gpu` in order, on this machine's GPU and a local platform
on it: ops/doctor_checks.py (the GPU alone) and ops/doctor_platform.py (the platform)
given their real pieces."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from thaw.bench.restore_cuda import CudaBenchParts, open_cuda_parts
from thaw.ops.doctor_checks import (
    DRIVER_TIMEOUT_S,
    PINNED_TIMEOUT_S,
    SLICE_TIMEOUT_S,
    Environment,
    check_driver_fingerprint,
    check_pinned_h2d,
    check_slice_ipc,
)
from thaw.ops.doctor_platform import platform_checks
from thaw.ops.doctor_run import Check, CheckFailed, CheckPlan
from thaw.snapshotter.runtime.gpuinfo import nvml_gpu_facts, read_proc_driver


@contextlib.contextmanager
def _opened_parts() -> Iterator[CudaBenchParts]:  # pragma: no cover - needs a GPU
    with (tempfile.TemporaryDirectory(prefix="thaw-doctor-") as tmp,
          open_cuda_parts(Path(tmp)) as parts):
        yield parts


def build_checks(env: Environment) -> CheckPlan:  # pragma: no cover - needs a GPU
    """The checks in order, on this machine's GPU and a local platform on it."""

    def driver() -> dict[str, Any]:
        with _opened_parts() as parts:
            node_driver = parts.devices.gpu_info()[1]
        return check_driver_fingerprint(read_proc_driver(), nvml_gpu_facts(), node_driver)

    results: dict[str, dict[str, Any]] = {}

    def pinned() -> dict[str, Any]:
        with _opened_parts() as parts:
            try:
                results["pinned_h2d"] = check_pinned_h2d(parts)
            except CheckFailed as exc:  # a slow copy still measured the ceiling
                results["pinned_h2d"] = exc.figures
                raise
        return results["pinned_h2d"]

    def slices() -> dict[str, Any]:
        with _opened_parts() as parts:
            return check_slice_ipc(parts.devices, parts.probe)

    on_platform = platform_checks(env, ceiling=lambda: results.get("pinned_h2d", {}))
    return CheckPlan([Check("driver_fingerprint", DRIVER_TIMEOUT_S, driver),
                      Check("pinned_h2d", PINNED_TIMEOUT_S, pinned),
                      Check("slice_ipc", SLICE_TIMEOUT_S, slices),
                      *on_platform.checks], close=on_platform.close)
