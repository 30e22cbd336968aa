"""The cuda device backend on a real GPU: allocate, fill from page-locked memory on
several streams, open the IPC handle in another process (as an instance does), view it
through DLPack, zero on release. Skipped unless CuPy imports and sees a GPU; the same
logic is unit-tested against the in-memory fake in tests/unit/test_cuda_backend.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.gpu.gpus import NEEDS_CUPY_GPU
from thaw.blobstore import ChunkRef, CudaPinnedAllocator, PinnedTier
from thaw.core.errors import NotFound, OutOfMemory
from thaw.platform.cuda import CudaDevices, CudaSlice
from thaw.platform.devices import SandboxNeeds

MiB = 1024 * 1024
CANARY = 0xA5
# A subprocess start plus CUDA context creation: seconds, not minutes.
INSTANCE_TIMEOUT_S = 120


pytestmark = NEEDS_CUPY_GPU

# The instance's side, in its own process: CUDA IPC handles cannot be opened by the
# process that exported them.
INSTANCE = r"""
import hashlib, json, sys
from thaw.platform.cuda_copy import open_slice

request = json.loads(sys.argv[1])
opened = open_slice(**request["slice"])
whole = opened.array()
import cupy
report = {
    "sha256": hashlib.sha256(whole[:request["nbytes"]].get().tobytes()).hexdigest(),
    "nonzero": int(cupy.count_nonzero(whole)),
    "canary": int(cupy.count_nonzero(whole == request["canary"])),
}
if request.get("tensor"):
    offset, nbytes, shape = request["tensor"]
    report["tensor"] = opened.tensor(offset, nbytes, "float32", shape=shape).cpu().tolist()
if request.get("fill") is not None:
    whole.fill(request["fill"])
    cupy.cuda.runtime.deviceSynchronize()
print(json.dumps(report))
"""


def as_instance(sl: CudaSlice, nbytes: int = 0, fill: int | None = None,
                tensor: tuple[int, int, list[int]] | None = None) -> dict[str, Any]:
    request = {"slice": sl.descriptor(), "nbytes": nbytes, "canary": CANARY, "fill": fill,
               "tensor": tensor}
    out = subprocess.run([sys.executable, "-c", INSTANCE, json.dumps(request)],
                         capture_output=True, text=True, timeout=INSTANCE_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return report


@pytest.fixture
def devices() -> Iterator[CudaDevices]:
    backend = CudaDevices(instance_overhead_bytes=0)
    try:
        yield backend
    finally:
        backend.close()


def pinned_arena(data: bytes, chunk: int) -> tuple[PinnedTier, list[ChunkRef]]:
    """`data` as chunks in a page-locked pinned tier, laid out in arena order."""
    refs = [ChunkRef(digest=hashlib.sha256(data[at:at + chunk]).hexdigest(), offset=at,
                     length=len(data[at:at + chunk]), stored_length=len(data[at:at + chunk]))
            for at in range(0, len(data), chunk)]
    by_digest = {ref.digest: data[ref.offset:ref.end] for ref in refs}

    class Source:
        def read_into(self, digest: str, out: memoryview) -> None:
            out[:] = by_digest[digest]

    tier = PinnedTier(2 * len(data) + 16 * MiB, allocator=CudaPinnedAllocator())
    tier.prewarm(refs, Source())
    return tier, refs


def test_restore_from_pinned_memory_reaches_the_instance_intact(devices: CudaDevices) -> None:
    data = np.random.default_rng(1).integers(0, 256, 64 * MiB + 123, dtype=np.uint8).tobytes()
    tier, refs = pinned_arena(data, 4 * MiB)
    sl = devices.allocate(len(data), "restore")
    stats = devices.restore_into_slice(sl, refs, tier, streams=4)
    assert stats.bytes == len(data) and stats.streams == 4
    report = as_instance(sl, nbytes=len(data))
    assert report["sha256"] == hashlib.sha256(data).hexdigest()
    # Past the arena, the rest of the allocation is still the zeroes it was handed out as.
    assert report["nonzero"] == int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8)))


def test_instance_views_the_slice_as_torch_tensors(devices: CudaDevices) -> None:
    probe = subprocess.run([sys.executable, "-c",
                            "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=INSTANCE_TIMEOUT_S)
    if probe.stdout.strip() != "True":
        pytest.skip("needs a CUDA build of torch")
    values = np.arange(12, dtype=np.float32)
    sl = devices.allocate(8 * MiB, "tensor")
    devices.copy_into_slice(sl, [(4096, values.tobytes())], streams=2)
    report = as_instance(sl, tensor=(4096, values.nbytes, [3, 4]))
    assert report["tensor"] == values.reshape(3, 4).tolist()


def test_canary_a_released_slice_is_zero_for_the_next_tenant(devices: CudaDevices) -> None:
    first = devices.allocate(32 * MiB, "tenant-a")
    as_instance(first, fill=CANARY)  # tenant A's instance writes all over its slice
    assert as_instance(first)["canary"] == first.size
    devices.release(first.id)
    second = devices.allocate(32 * MiB, "tenant-b")
    assert second.device_id == first.device_id
    report = as_instance(second)
    assert (report["canary"], report["nonzero"]) == (0, 0)


def test_books_fill_up_and_free_again(devices: CudaDevices) -> None:
    before = {u.id: u for u in devices.usage()}
    sl = devices.allocate(64 * MiB, "books")
    after = {u.id: u for u in devices.usage()}
    assert after[sl.device_id].used - before[sl.device_id].used == sl.allocated
    largest = max(u.capacity - u.used for u in after.values())
    with pytest.raises(OutOfMemory, match="no GPU has room"):
        devices.allocate(largest + 1, "too-big")
    devices.release(sl.id)
    assert {u.id: u.used for u in devices.usage()} == {k: u.used for k, u in before.items()}
    with pytest.raises(NotFound):
        devices.release(sl.id)


def test_each_slice_has_its_own_handle(devices: CudaDevices) -> None:
    one = devices.allocate(4 * MiB, "one")
    two = devices.allocate(4 * MiB, "two")
    assert one.ipc_handle != two.ipc_handle
    devices.copy_into_slice(one, [(0, bytes([1]) * MiB)])
    devices.copy_into_slice(two, [(0, bytes([2]) * MiB)])
    assert as_instance(one, nbytes=MiB)["sha256"] == hashlib.sha256(bytes([1]) * MiB).hexdigest()
    assert as_instance(two, nbytes=MiB)["sha256"] == hashlib.sha256(bytes([2]) * MiB).hexdigest()


def test_the_interface_describes_the_real_gpus(devices: CudaDevices) -> None:
    """What runtimes and telemetry ask of the backend instead of its name, on hardware:
    the slice's GPU by UUID, the agent's PID namespace, NVML's model and driver."""
    assert devices.sandbox_needs() == SandboxNeeds(gpus=True, host_pid_namespace=True)
    assert all(u.gpu for u in devices.usage())
    sl = devices.allocate(4 * MiB, "fn")
    assert isinstance(sl, CudaSlice)
    (uuid,) = sl.gpu_ids()
    assert uuid.startswith("GPU-") and uuid == sl.device_uuid
    model, driver = devices.gpu_info()
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert (model, driver) == ("", "")
    else:
        assert model and driver[:1].isdigit()
