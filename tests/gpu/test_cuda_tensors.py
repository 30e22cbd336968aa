"""CUDA tensors through build -> restore (needs a GPU; skipped everywhere else)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.gpu.gpus import NEEDS_TORCH_GPU
from tests.runtime.conftest import (
    Processes,
    kill_pid,
    start_build,
    start_fresh,
    start_template,
    wait_ready,
)
from tests.runtime.test_state_round_trip import call

pytestmark = NEEDS_TORCH_GPU


def test_cuda_tensors_restore_equal_fresh_and_keep_views(processes: Processes,
                                                         tmp_path: Path) -> None:
    fresh_process, fresh_socket = start_fresh(processes, "cuda_tensors")
    snapshot = start_build(processes, "cuda_tensors", tmp_path / "snap").snapshot()
    assert snapshot.captured["device_size"] > 0  # CUDA storages went to the device arena
    wait_ready(fresh_process)
    # As the agent does: a slice of its own, filled with the device arena, handed over
    # by its IPC handle with the spawn request; the instance views it, copying nothing.
    from thaw.platform.cuda import CudaDevices
    from thaw.platform.slice_fill import slice_handover

    devices = CudaDevices(instance_overhead_bytes=0)
    arena = (snapshot.folder / "device.arena").read_bytes()
    sl = devices.allocate(len(arena) + (64 << 20), "cuda-tensors")
    try:
        devices.copy_into_slice(sl, [(0, arena)])
        descriptor, _fd = slice_handover(sl)
        socket_path = processes.socket_path("instance")
        request = snapshot.spawn_request(socket_path, processes.log_dir / "cuda.log")
        request["slice"] = descriptor.to_record()
        instance = start_template(processes, snapshot).spawn(processes, request)
        restored = call(instance.socket)
        fresh = call(fresh_socket)
        assert restored["device"].startswith("cuda")
        assert restored["weight"] == fresh["weight"] and restored["bias"] == fresh["bias"]
        assert restored["row_shares_weight"] is True
        kill_pid(instance.pid)  # a slice is freed only once no instance maps it
        deadline = time.monotonic() + 10
        while Path(f"/proc/{instance.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        devices.close()
