"""CUDA tensors through build -> restore (needs a GPU; skipped everywhere else)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.conftest import Processes, start_build, start_fresh, start_template, wait_ready
from tests.runtime.test_state_round_trip import call


def _gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU (none in CI)")]


def test_cuda_tensors_restore_equal_fresh_and_keep_views(processes: Processes,
                                                         tmp_path: Path) -> None:
    fresh_process, fresh_socket = start_fresh(processes, "cuda_tensors")
    snapshot = start_build(processes, "cuda_tensors", tmp_path / "snap").snapshot()
    assert snapshot.captured["device_size"] > 0  # CUDA storages went to the device arena
    wait_ready(fresh_process)
    instance = start_template(processes, snapshot).spawn(processes)
    restored = call(instance.socket)
    fresh = call(fresh_socket)
    assert restored["device"].startswith("cuda")
    assert restored["weight"] == fresh["weight"] and restored["bias"] == fresh["bias"]
    assert restored["row_shares_weight"] is True
