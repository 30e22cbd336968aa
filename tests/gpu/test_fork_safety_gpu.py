"""Fork safety on a real GPU (skipped without one): a module-level device query
initialises CUDA and the template says so (real torch, and real CuPy where installed);
a module-level torch.cuda.is_available() alone does not, under the NVML-based check
templates run with, and the forked instance then uses the GPU itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.gpu.gpus import NEEDS_TORCH_GPU
from tests.runtime.conftest import Client, Processes, Snapshot, start_template

BUNDLE = "cuda_at_import"


pytestmark = NEEDS_TORCH_GPU


def build_with(processes: Processes, handler: str, out: Path) -> Snapshot:
    started = processes.start("build", BUNDLE, "--out", str(out), handler=handler)
    captured = started.event()
    assert captured["event"] == "captured", (captured, started.describe())
    return Snapshot(BUNDLE, out, captured)


def test_a_real_torch_device_query_at_import_makes_the_template_unsafe(
        processes: Processes, tmp_path: Path) -> None:
    handler = "torch_app:TorchAtImport"
    template = start_template(processes, build_with(processes, handler, tmp_path / "t"),
                              handler=handler)
    assert template.ready["fork_safe"] is False
    assert template.ready["unsafe_reason"] == (
        "torch initialised CUDA at import (module torch_app)")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs CuPy")
def test_a_real_cupy_query_at_import_makes_the_template_unsafe(
        processes: Processes, tmp_path: Path) -> None:
    template = start_template(processes, build_with(processes, "app:CudaAtImport",
                                                    tmp_path / "c"))
    assert template.ready["fork_safe"] is False
    assert template.ready["unsafe_reason"] == "CuPy initialised CUDA at import (module app)"


def test_is_available_at_import_keeps_the_template_forking(processes: Processes,
                                                            tmp_path: Path) -> None:
    handler = "nvml_app:NvmlOnly"
    template = start_template(processes, build_with(processes, handler, tmp_path / "n"),
                              handler=handler)
    assert template.ready["fork_safe"] is True, template.ready
    instance = template.spawn(processes)
    client = Client(instance.socket)
    try:
        response = client.invoke({})
    finally:
        client.close()
    assert response.status == 200, response.body
    assert response.json() == {"available": True, "total": 4.0, "pid": instance.pid}
