"""`thaw bench restore --device cuda` on the in-memory CUDA fake: the restore goes
through the platform's pinned tier and cuda backend, the ceiling is one plain copy from a
page-locked buffer, the slice is read back from "another process", and everything taken
is given back. Without a GPU the command says so and fails."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from thaw.bench.restore_cuda import CudaBenchParts, run_cuda_restore_bench
from thaw.bench.slice_probe import InMemorySliceProbe, ProbeReport, ProbeRequest
from thaw.blobstore import HostRegion, MemfdAllocator, PinnedTier
from thaw.core.errors import ThawError
from thaw.platform.cuda import CudaDevices, CudaSliceDescriptor, InMemoryCudaApi, MiB


class HeapBuffers:
    """The ceiling's source in ordinary memory (the fake copies from anything)."""

    def __init__(self) -> None:
        self.live = 0

    def allocate(self, nbytes: int) -> memoryview:
        self.live += 1
        return memoryview(bytearray(nbytes))

    def free(self, buffer: memoryview) -> None:
        self.live -= 1


def fake_parts(api: InMemoryCudaApi, probe: object = None) -> CudaBenchParts:
    devices = CudaDevices(api, reserve_bytes=0, instance_overhead_bytes=0)
    return CudaBenchParts(devices=devices, api=api, tier_memory=None,
                          baseline_memory=HeapBuffers(),
                          probe=probe or InMemorySliceProbe(api),  # type: ignore[arg-type]
                          gpu_name="Fake GPU")


def test_cuda_restore_bench_reports_restore_against_the_ceiling() -> None:
    api = InMemoryCudaApi([64 * MiB])
    size = 3 * MiB + 5
    parts = fake_parts(api)
    result = run_cuda_restore_bench(size, parts, chunk_size=1 * MiB, rounds=2,
                                    streams=2, workers=2)
    assert set(result) == {"device", "gpu", "bytes", "restore_gbps", "h2d_gbps", "ratio",
                           "streams", "chunk_size", "rounds", "pinned_memory"}
    assert (result["device"], result["gpu"], result["bytes"]) == ("cuda", "Fake GPU", size)
    assert (result["streams"], result["rounds"]) == (2, 2)
    assert result["pinned_memory"] == PinnedTier(1).allocator.name
    for key in ("restore_gbps", "h2d_gbps", "ratio"):
        assert isinstance(result[key], float) and result[key] > 0
    assert json.loads(json.dumps(result)) == result

    copies = api.calls_named("copy")
    # Each round: the restore split over two streams, then one ceiling copy of it all.
    ceiling = [c for c in copies if c[3] == size]
    assert len(ceiling) == 2
    restore_streams = {c[4] for c in copies if c[3] != size}
    assert len(restore_streams) >= 2
    assert sum(c[3] for c in copies if c[3] != size) == 2 * size
    # Slice, ceiling buffers and streams all given back.
    assert api.allocations == {} and api.streams == {}
    assert isinstance(parts.baseline_memory, HeapBuffers) and parts.baseline_memory.live == 0


class CountingMemory(MemfdAllocator):
    """The agent's kind of pinned memory, counting regions not yet given back."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0

    def allocate(self, nbytes: int) -> HostRegion:
        region = super().allocate(nbytes)
        self.live += 1
        return region

    def free(self, region: HostRegion) -> None:
        self.live -= 1
        super().free(region)


def test_the_pinned_tiers_regions_are_given_back_through_the_allocator() -> None:
    api = InMemoryCudaApi([64 * MiB])
    memory = CountingMemory()
    parts = fake_parts(api)
    parts = CudaBenchParts(devices=parts.devices, api=api, tier_memory=memory,
                           baseline_memory=HeapBuffers(), probe=parts.probe)
    result = run_cuda_restore_bench(2 * MiB, parts, chunk_size=1 * MiB, rounds=1, workers=1)
    assert result["pinned_memory"] == memory.name
    assert memory.live == 0


def test_a_slice_that_reads_back_wrong_fails_the_bench_and_frees_everything() -> None:
    api = InMemoryCudaApi([64 * MiB])

    def wrong(descriptor: CudaSliceDescriptor, request: ProbeRequest) -> ProbeReport:
        return ProbeReport(sha256="0" * 64, nonzero=-1, open_s=0.0)

    with pytest.raises(ThawError, match="differs"):
        run_cuda_restore_bench(2 * MiB, fake_parts(api, wrong), chunk_size=1 * MiB,
                               rounds=1, workers=1)
    assert api.allocations == {} and api.streams == {}


def test_bad_sizes_are_refused_naming_the_field() -> None:
    api = InMemoryCudaApi([64 * MiB])
    with pytest.raises(ThawError) as caught:
        run_cuda_restore_bench(0, fake_parts(api))
    assert getattr(caught.value, "field", None) == "size"


def _gpu_here() -> bool:
    try:
        import cupy  # type: ignore[import-not-found]

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


@pytest.mark.skipif(_gpu_here(), reason="this machine has a GPU (tests/gpu runs the bench)")
def test_bench_restore_on_cuda_without_a_gpu_says_so_and_fails() -> None:
    done = subprocess.run([sys.executable, "-m", "thaw.ops", "bench", "restore",
                           "--device", "cuda", "--size", "1MiB", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no CUDA device" in done.stderr
    assert done.stdout.strip() == ""


def test_bench_restore_without_device_is_the_host_benchmark() -> None:
    done = subprocess.run([sys.executable, "-m", "thaw.ops", "bench", "restore",
                           "--size", "1MiB", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == {"bytes", "restore_gbps", "memcpy_gbps", "ratio",
                                            "disk_restore_gbps", "disk_ratio", "workers",
                                            "chunk_size"}
