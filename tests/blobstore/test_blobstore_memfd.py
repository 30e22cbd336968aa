"""The pinned tier in sealed memfds: names, exact sizes, seals, memory given back on
eviction, page-locking through a fake cudaHostRegister, and mlock within RLIMIT_MEMLOCK."""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import random
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from thaw.blobstore import (
    MEMFD_PREFIX,
    ChunkRef,
    CudaPinnedAllocator,
    DiskTier,
    MemfdAllocator,
    PinnedTier,
    digest_of,
    store_arena,
)
from thaw.blobstore.allocators import PAGE_SIZE, SEALS
from thaw.blobstore.pagelock import (
    CUDA_HOST_REGISTER_PORTABLE,
    CUDA_HOST_REGISTER_READ_ONLY,
    LockRefused,
)

KIB = 1024
MIB = 1024 * KIB


def block(tag: int, size: int) -> bytes:
    return random.Random(tag).randbytes(size)


class MemorySource:
    """Chunks from a dict, as the disk tier would hand them over (already verified)."""

    def __init__(self, chunks: dict[str, bytes]) -> None:
        self.chunks = chunks

    def read_into(self, digest: str, out: memoryview) -> None:
        out[:] = self.chunks[digest]


def arena(sizes: list[int], seed: int = 0) -> tuple[list[ChunkRef], MemorySource]:
    refs: list[ChunkRef] = []
    chunks: dict[str, bytes] = {}
    offset = 0
    for index, size in enumerate(sizes):
        data = block(seed * 1000 + index, size)
        digest = digest_of(data)
        chunks[digest] = data
        refs.append(ChunkRef(digest, offset, size, size))
        offset += size
    return refs, MemorySource(chunks)


def address_of(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def mapping_name(address: int) -> str:
    """The name /proc/self/maps gives the mapping holding `address` ("" if none)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(part, 16) for part in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) > 5 else ""
    return ""


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


class RecordingLocker:
    """A PageLocker that records what it is asked to lock, and can refuse."""

    name = "recording"

    def __init__(self, refuse: str = "") -> None:
        self.refuse = refuse
        self.locked: dict[int, int] = {}
        self.unlocked: list[tuple[int, int, str]] = []  # (address, length, mapping name)

    def lock(self, address: int, length: int) -> None:
        if self.refuse:
            raise LockRefused(self.refuse)
        assert address % PAGE_SIZE == 0 and address not in self.locked
        self.locked[address] = length

    def unlock(self, address: int, length: int) -> None:
        # Unlocked while still mapped: the name of the mapping is still there.
        self.unlocked.append((address, length, mapping_name(address)))
        assert self.locked.pop(address) == length

    def refusal_for(self, capacity: int) -> str:
        return ""


class FakeCudaRuntime:
    """CuPy's runtime as far as the tier uses it: hostRegister / hostUnregister."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.registered: dict[int, tuple[int, int]] = {}  # ptr -> (size, flags)
        self.calls: list[tuple[str, int]] = []
        self.mapped_at_unregister: list[str] = []

    def hostRegister(self, ptr: int, size: int, flags: int) -> None:  # noqa: N802
        self.calls.append(("register", ptr))
        if self.fail:
            raise RuntimeError("cudaErrorHostMemoryAlreadyRegistered")
        self.registered[ptr] = (size, flags)

    def hostUnregister(self, ptr: int) -> None:  # noqa: N802
        self.calls.append(("unregister", ptr))
        self.mapped_at_unregister.append(mapping_name(ptr))
        del self.registered[ptr]


def test_regions_are_memfds_named_thaw_pinned() -> None:
    tier = PinnedTier(MIB, allocator=MemfdAllocator())
    digest = tier.put(block(1, 10 * KIB))
    with tier.hold([digest]) as spans:
        span = spans[digest]
        assert span.fd >= 0 and span.file_offset == span.start == 0
        link = os.readlink(f"/proc/self/fd/{span.fd}")
        assert link.startswith(f"/memfd:{MEMFD_PREFIX}"), link
        # The view restores copy from is that memfd's mapping.
        assert mapping_name(address_of(span.view())).startswith(f"/memfd:{MEMFD_PREFIX}")
        assert bytes(span.view()) == block(1, 10 * KIB)
        assert os.pread(span.fd, 10 * KIB, 0) == block(1, 10 * KIB)


def test_the_default_tier_uses_memfds_too() -> None:
    tier = PinnedTier(MIB)
    digest = tier.put(block(2, 4 * KIB))
    with tier.hold([digest]) as spans:
        assert os.readlink(f"/proc/self/fd/{spans[digest].fd}").startswith(
            f"/memfd:{MEMFD_PREFIX}")


def test_a_prewarm_takes_its_bytes_rounded_to_a_page_per_chunk_at_most() -> None:
    sizes = [64 * KIB, 64 * KIB, 64 * KIB + 1, 5000, 123]
    refs, source = arena(sizes)
    locker = RecordingLocker()
    tier = PinnedTier(MIB, allocator=MemfdAllocator(locker))
    assert tier.prewarm(refs, source) == sum(sizes)
    with tier.hold(ref.digest for ref in refs) as spans:
        fds = {span.fd for span in spans.values()}
        assert len(fds) == 1  # one region per prewarm
        stat = os.fstat(fds.pop())
        for ref in refs:
            span = spans[ref.digest]
            assert os.pread(span.fd, ref.length, span.file_offset) == source.chunks[ref.digest]
    total = sum(sizes)
    assert total <= stat.st_size <= total + PAGE_SIZE * len(sizes)
    assert stat.st_size % PAGE_SIZE == 0
    assert stat.st_blocks * 512 == stat.st_size  # resident: every page of it, no more
    assert sum(locker.locked.values()) == stat.st_size
    assert tier.usage().used == total


def test_a_filled_region_is_sealed_against_writes() -> None:
    tier = PinnedTier(MIB, allocator=MemfdAllocator())
    data = block(3, 8 * KIB)
    digest = tier.put(data)
    with tier.hold([digest]) as spans:
        fd = spans[digest].fd
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        with pytest.raises(OSError) as written:
            os.pwrite(fd, b"x", 0)
        assert written.value.errno == errno.EPERM
        with pytest.raises(OSError) as mapped:
            mmap.mmap(fd, 8 * KIB, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        assert mapped.value.errno == errno.EPERM
        with pytest.raises(OSError) as shrunk:
            os.ftruncate(fd, 0)
        assert shrunk.value.errno == errno.EPERM
        with pytest.raises(OSError) as punched:
            hole = mmap.mmap(fd, 8 * KIB, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            try:
                hole.madvise(mmap.MADV_REMOVE, 0, PAGE_SIZE)
            finally:
                hole.close()
        assert punched.value.errno in (errno.EPERM, errno.EACCES)
        assert spans[digest].view().readonly
        # What an instance does with it: a private copy-on-write mapping, its own pages.
        private = mmap.mmap(fd, 8 * KIB, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        private[0] = private[0] ^ 0xFF
        private.close()
    assert tier.get(digest) == data


def test_evicting_a_sealed_region_gives_its_memory_back() -> None:
    refs, source = arena([MIB, MIB, MIB], seed=4)
    tier = PinnedTier(8 * MIB, allocator=MemfdAllocator())
    tier.prewarm(refs, source)
    with tier.hold([refs[0].digest]) as spans:
        fd = spans[refs[0].digest].fd
        name = os.readlink(f"/proc/self/fd/{fd}")
        address = address_of(spans[refs[0].digest].region)
    shmem_before = status_kib("RssShmem")
    assert os.fstat(fd).st_blocks * 512 >= 3 * MIB

    # One chunk of three: a sealed region cannot give pages back one range at a time,
    # so its bytes stay counted (dead) until the region goes.
    assert tier.evict([refs[1].digest]) == 0
    usage = tier.usage()
    assert (usage.used, usage.dead, usage.chunks) == (3 * MIB, MIB, 2)
    assert os.readlink(f"/proc/self/fd/{fd}") == name

    assert tier.evict([refs[0].digest, refs[2].digest]) == 3 * MIB
    usage = tier.usage()
    assert (usage.used, usage.dead, usage.chunks) == (0, 0, 0)
    # The memfd is closed and unmapped: nothing holds its pages any more.
    assert all(os.readlink(f"/proc/self/fd/{entry}") != name
               for entry in os.listdir("/proc/self/fd")
               if os.path.islink(f"/proc/self/fd/{entry}"))
    assert mapping_name(address) != name
    assert not any(line.endswith(name)
                   for line in Path("/proc/self/maps").read_text().splitlines())
    assert status_kib("RssShmem") <= shmem_before - 3 * MIB // KIB


def test_a_chunk_another_prewarm_published_first_is_kept_once() -> None:
    refs, source = arena([64 * KIB, 64 * KIB, 64 * KIB], seed=5)
    tier = PinnedTier(MIB, allocator=MemfdAllocator())

    class Racing(MemorySource):
        def read_into(self, digest: str, out: memoryview) -> None:
            if digest == refs[1].digest:  # another thread publishes it first
                tier.put(self.chunks[digest])
            super().read_into(digest, out)

    tier.prewarm(refs, Racing(source.chunks), workers=1)
    with tier.hold([refs[0].digest]) as spans:
        stat = os.fstat(spans[refs[0].digest].fd)
    # The region was made for three chunks: the middle one's slot stays in it (a sealed
    # region goes back whole) and is counted, as dead bytes, until the region goes.
    assert stat.st_size == stat.st_blocks * 512 == 3 * 64 * KIB
    usage = tier.usage()
    assert (usage.used, usage.dead, usage.chunks) == (4 * 64 * KIB, 64 * KIB, 3)
    assert tier.evict([refs[0].digest, refs[2].digest]) == 3 * 64 * KIB
    assert (tier.usage().used, tier.usage().dead) == (64 * KIB, 0)


def test_room_is_made_by_evicting_whole_regions_only() -> None:
    refs, source = arena([4 * KIB, 4 * KIB], seed=6)
    tier = PinnedTier(3 * 4 * KIB, allocator=MemfdAllocator())
    tier.prewarm(refs, source)  # one region of two chunks
    single = tier.put(block(60, 4 * KIB))
    tier.get(refs[0].digest)  # LRU now: refs[1], single, refs[0]
    tier.put(block(61, 4 * KIB))
    # Evicting refs[1] alone would have freed nothing: the single-chunk region went.
    assert tier.has(refs[0].digest) and tier.has(refs[1].digest)
    assert not tier.has(single)
    usage = tier.usage()
    assert (usage.used, usage.dead, usage.evictions) == (3 * 4 * KIB, 0, 1)


def test_prewarm_through_cuda_host_register_pins_exactly_what_it_loads() -> None:
    sizes = [256 * KIB, 256 * KIB, 256 * KIB, 100 * KIB + 7]
    refs, source = arena(sizes, seed=7)
    runtime = FakeCudaRuntime()
    tier = PinnedTier(4 * MIB, allocator=CudaPinnedAllocator(runtime))
    tier.prewarm(refs, source)
    more, more_source = arena([3 * KIB], seed=8)
    tier.prewarm(more, more_source)
    loaded = sum(sizes) + 3 * KIB
    registered = sum(size for size, _ in runtime.registered.values())
    assert loaded <= registered <= loaded + PAGE_SIZE * (len(sizes) + 1)
    assert {flags for _, flags in runtime.registered.values()} == {
        CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_READ_ONLY}
    with tier.hold(ref.digest for ref in refs) as spans:
        assert address_of(spans[refs[0].digest].region) in runtime.registered
    assert tier.usage().locked and tier.usage().lock_refusal == ""

    tier.evict(ref.digest for ref in refs + more)
    assert runtime.registered == {}
    # Unregistered while still mapped (the driver unpins before the pages go).
    assert all(name.startswith(f"/memfd:{MEMFD_PREFIX}")
               for name in runtime.mapped_at_unregister)
    assert [call for call, _ in runtime.calls] == ["register", "register",
                                                   "unregister", "unregister"]


def test_a_refused_registration_leaves_the_tier_working_and_says_why() -> None:
    refs, source = arena([64 * KIB], seed=9)
    tier = PinnedTier(MIB, allocator=CudaPinnedAllocator(FakeCudaRuntime(fail=True)))
    tier.prewarm(refs, source)
    assert tier.get(refs[0].digest) == source.chunks[refs[0].digest]
    usage = tier.usage()
    assert not usage.locked
    assert "cudaHostRegister" in usage.lock_refusal
    assert "AlreadyRegistered" in usage.lock_refusal
    tier.evict([refs[0].digest])  # no unregister of what was never registered
    assert tier.usage().used == 0


def test_a_tier_without_a_locker_says_it_is_not_locked() -> None:
    usage = PinnedTier(MIB, allocator=MemfdAllocator()).usage()
    assert not usage.locked and usage.lock_refusal == "no page locking configured"


MLOCK_PROBE = textwrap.dedent("""
    import json, resource, sys
    from thaw.blobstore import PinnedTier
    from thaw.blobstore.pagelock import memlock_limit

    soft = int(sys.argv[1])
    _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if hard != resource.RLIM_INFINITY and soft > hard:
        soft = hard
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))

    def vmlck():
        for line in open("/proc/self/status"):
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
        return -1

    tier = PinnedTier(1024 * 1024)
    before = tier.usage()
    digest = tier.put(bytes(range(256)) * 1024)  # 256 KiB
    after = tier.usage()
    locked = vmlck()
    tier.evict([digest])
    print(json.dumps({"limit": memlock_limit(), "before": [before.locked, before.lock_refusal],
                      "after": [after.locked, after.lock_refusal], "vmlck": locked,
                      "vmlck_after_evict": vmlck(), "data_ok": True}))
""")


def run_mlock_probe(soft_limit: int) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", MLOCK_PROBE, str(soft_limit)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_below_rlimit_memlock_the_tier_runs_unlocked_and_says_why() -> None:
    report = run_mlock_probe(64 * KIB)
    assert report["limit"] == 64 * KIB
    assert report["before"] == [False, "RLIMIT_MEMLOCK 64.0 KiB < 1.0 MiB"]
    assert report["after"][0] is False
    assert report["after"][1] == "RLIMIT_MEMLOCK 64.0 KiB < 1.0 MiB"
    assert report["vmlck"] == 0  # nothing locked past the operator's limit


def test_within_rlimit_memlock_the_regions_are_mlocked() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if hard != resource.RLIM_INFINITY and hard < 2 * MIB:
        pytest.skip(f"the hard RLIMIT_MEMLOCK ({hard} bytes) is below the probe's 2 MiB")
    report = run_mlock_probe(2 * MIB)
    assert report["before"] == [True, ""] and report["after"] == [True, ""]
    assert report["vmlck"] == 256 * KIB
    assert report["vmlck_after_evict"] == 0


def test_disk_prewarm_and_restore_through_sealed_regions(tmp_path: Path) -> None:
    from thaw.blobstore import restore_arena

    disk = DiskTier(tmp_path / "chunks")
    data = b"".join(block(i, 16 * KIB) for i in range(8)) + block(99, 1000)
    refs = store_arena(disk, data, chunk_size=16 * KIB)
    tier = PinnedTier(MIB, allocator=MemfdAllocator(RecordingLocker()))
    tier.prewarm(refs, disk)
    out = bytearray(len(data))
    stats = restore_arena(refs, out, disk=disk, pinned=tier)
    assert stats.from_pinned_bytes == len(data) and bytes(out) == data


def test_a_failed_unregister_still_gives_the_region_back() -> None:
    from thaw.core.errors import ThawError

    class Failing(FakeCudaRuntime):
        def hostUnregister(self, ptr: int) -> None:  # noqa: N802
            raise RuntimeError("cudaErrorHostMemoryNotRegistered")

    refs, source = arena([64 * KIB], seed=10)
    tier = PinnedTier(MIB, allocator=CudaPinnedAllocator(Failing()))
    tier.prewarm(refs, source)
    with tier.hold([refs[0].digest]) as spans:
        name = os.readlink(f"/proc/self/fd/{spans[refs[0].digest].fd}")
    with pytest.raises(ThawError, match="cudaHostUnregister"):
        tier.evict([refs[0].digest])
    assert tier.usage().used == 0
    assert not any(line.endswith(name)
                   for line in Path("/proc/self/maps").read_text().splitlines())
