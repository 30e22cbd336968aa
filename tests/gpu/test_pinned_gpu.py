"""The pinned tier on a real GPU: sealed memfd regions page-locked with cudaHostRegister
(read-only, exact size), seen by the driver as pinned host memory, and copied to the
device intact. Skipped unless CuPy imports and sees a GPU; the accounting is unit-tested
with a fake runtime in tests/blobstore/test_blobstore_memfd.py."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tests.gpu.gpus import NEEDS_CUPY_GPU
from thaw.blobstore import ChunkRef, CudaPinnedAllocator, PinnedTier
from thaw.blobstore.allocators import PAGE_SIZE

MiB = 1024 * 1024
# cudaMemoryType: registered (page-locked) host memory; cudaMemcpyKind: host to device.
CUDA_MEMORY_TYPE_HOST = 1
CUDA_MEMCPY_HOST_TO_DEVICE = 1
# cudaDeviceAttr: cudaHostRegister accepts cudaHostRegisterReadOnly.
CUDA_DEV_ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED = 113


pytestmark = NEEDS_CUPY_GPU


def test_a_prewarm_pins_its_exact_bytes_and_copies_to_the_device_intact() -> None:
    import cupy

    data = np.random.default_rng(3).integers(0, 256, 48 * MiB + 4321, dtype=np.uint8)
    raw = data.tobytes()
    chunk = 4 * MiB
    refs = [ChunkRef(hashlib.sha256(raw[at:at + chunk]).hexdigest(), at,
                     len(raw[at:at + chunk]), len(raw[at:at + chunk]))
            for at in range(0, len(raw), chunk)]
    by_digest = {ref.digest: raw[ref.offset:ref.end] for ref in refs}

    class Source:
        def read_into(self, digest: str, out: memoryview) -> None:
            out[:] = by_digest[digest]

    tier = PinnedTier(len(raw) + 16 * MiB, allocator=CudaPinnedAllocator())
    tier.prewarm(refs, Source())
    usage = tier.usage()
    supported = cupy.cuda.runtime.deviceGetAttribute(
        CUDA_DEV_ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED, 0)
    if not supported:
        assert not usage.locked and "cudaHostRegister" in usage.lock_refusal
        pytest.skip("this GPU does not take read-only host registrations")
    assert usage.locked, usage.lock_refusal

    with tier.hold(ref.digest for ref in refs) as spans:
        region = spans[refs[0].digest].region
        assert len(region) <= len(raw) + PAGE_SIZE * len(refs)
        host = int(np.frombuffer(region, dtype=np.uint8).ctypes.data)
        attributes = cupy.cuda.runtime.pointerGetAttributes(host)
        kind = getattr(attributes, "type", getattr(attributes, "memoryType", None))
        assert kind == CUDA_MEMORY_TYPE_HOST
        device = cupy.empty(len(raw), dtype=cupy.uint8)
        cupy.cuda.runtime.memcpy(device.data.ptr, host, len(raw),
                                 CUDA_MEMCPY_HOST_TO_DEVICE)
        cupy.cuda.runtime.deviceSynchronize()
    assert hashlib.sha256(device.get().tobytes()).hexdigest() == hashlib.sha256(raw).hexdigest()
    assert tier.evict(ref.digest for ref in refs) == len(raw)
