"""`thaw bench restore`: how close a snapshot restore gets to the machine's memory bandwidth.

One run, side by side (DESIGN.md section 10): an incompressible state of the requested
size is stored on a disk tier and prewarmed into a pinned tier; then, alternating rounds,
(a) restore_arena from the pinned tier into a host slice and (b) the best plain parallel
memcpy of the same bytes into the same kind of slice; finally a restore from the disk tier
with the page cache warm. A host slice is what the host device backend hands an instance:
a /dev/shm file mapped shared and writable.

Fairness: both destinations are separate slices of the same size, pre-faulted the same
way before any timing (so neither side pays page faults the other does not); both copy
with np.copyto in byte ranges per thread; memcpy gets the best over every thread count
from 1 to the core count and over all rounds; restore gets the best over the same rounds
at its one configured thread count, timed around the whole call (pinning, planning,
thread pool start-up included).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from thaw.blobstore import CHUNK_SIZE, DiskTier, PinnedTier, restore_arena, store_arena
from thaw.blobstore.bounded import default_workers, resolve_workers
from thaw.blobstore.copying import copy_bytes, split_ranges
from thaw.core.errors import InvalidArgument, ThawError
from thaw.core.memfd import MADV_POPULATE_WRITE, populate

# Rounds of restore-vs-memcpy; best-of-N is taken for both sides, interleaved so both
# see the same machine. Ten rides out noise from neighbours on a shared 2-core VM and
# costs ~3 s at 2 GiB.
ROUNDS = 10

# Rounds of the disk restore (~1 s each at 2 GiB: it is bound by SHA-256 at ~1.7 GB/s
# per core).
DISK_ROUNDS = 3

# Where host slices live; falls back to the temp dir where there is no /dev/shm.
_SHM_DIR = Path("/dev/shm")


def run_restore_bench(size_bytes: int, workers: int | None = None, *,
                      chunk_size: int = CHUNK_SIZE, rounds: int = ROUNDS) -> dict[str, float | int]:
    """Measure restore vs memcpy at `size_bytes`; returns the `thaw bench restore --json`
    object. Rates are GB/s (1e9 bytes per second)."""
    if not isinstance(size_bytes, int) or size_bytes < 1:
        raise InvalidArgument(f"size must be a positive number of bytes, got {size_bytes!r}",
                              field="size")
    if rounds < 1:
        raise InvalidArgument(f"rounds must be >= 1, got {rounds!r}", field="rounds")
    threads = resolve_workers(workers)
    state = incompressible_state(size_bytes)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="thaw-bench-")))
        disk = DiskTier(scratch / "chunks")
        refs = store_arena(disk, state.data, chunk_size, threads)
        pinned = PinnedTier(size_bytes)
        pinned.prewarm(refs, disk, workers=threads)

        restore_slice = stack.enter_context(_host_slice(size_bytes, scratch))
        memcpy_slice = stack.enter_context(_host_slice(size_bytes, scratch))
        memcpy_pools = [(count, stack.enter_context(ThreadPoolExecutor(count)))
                        for count in range(1, max(threads, default_workers()) + 1)]

        restore_best = memcpy_best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            stats = restore_arena(refs, restore_slice, disk=disk, pinned=pinned,
                                  workers=threads)
            restore_best = min(restore_best, time.perf_counter() - started)
            if stats.from_pinned_bytes != size_bytes:
                raise ThawError(f"restore read {stats.from_disk_bytes} bytes from disk; "
                                f"the pinned tier should have held all of them")
            for count, pool in memcpy_pools:
                memcpy_best = min(memcpy_best,
                                  _parallel_memcpy(memcpy_slice, state, pool, count))
        _check_equal(restore_slice, state, "pinned restore")

        _wipe(restore_slice)
        restore_arena(refs, restore_slice, disk=disk, workers=threads)  # warm the page cache
        disk_best = float("inf")
        for _ in range(min(rounds, DISK_ROUNDS)):
            started = time.perf_counter()
            restore_arena(refs, restore_slice, disk=disk, workers=threads)
            disk_best = min(disk_best, time.perf_counter() - started)
        _check_equal(restore_slice, state, "disk restore")

    restore_gbps = size_bytes / restore_best / 1e9
    memcpy_gbps = size_bytes / memcpy_best / 1e9
    disk_gbps = size_bytes / disk_best / 1e9
    return {
        "bytes": size_bytes,
        "restore_gbps": round(restore_gbps, 3),
        "memcpy_gbps": round(memcpy_gbps, 3),
        "ratio": round(restore_gbps / memcpy_gbps, 3),
        "disk_restore_gbps": round(disk_gbps, 3),
        "disk_ratio": round(disk_gbps / memcpy_gbps, 3),
        "workers": threads,
        "chunk_size": chunk_size,
    }


def incompressible_state(size_bytes: int) -> np.ndarray:
    """Float32 'weights' in [-0.02, 0.02): random mantissas, so LZ4 saves nothing and
    every chunk is stored raw, as real model weights are. (Uniform, not normal: it is
    4x faster to draw and compresses no better.)"""
    rng = np.random.default_rng(seed=int.from_bytes(os.urandom(8), "little"))
    floats = rng.random(-(-size_bytes // 4), dtype=np.float32)
    floats -= np.float32(0.5)
    floats *= np.float32(0.04)
    return floats.view(np.uint8)[:size_bytes]


@contextlib.contextmanager
def _host_slice(size_bytes: int, fallback_dir: Path) -> Iterator[mmap.mmap]:
    """A shared-memory file mapped writable, every page faulted in before timing starts."""
    directory = _SHM_DIR if _SHM_DIR.is_dir() else fallback_dir
    path = directory / f"thaw-bench-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
        mapping = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
        path.unlink()  # the mapping keeps the pages; nothing left behind if we die
    try:
        _prefault(mapping)
        yield mapping
    finally:
        mapping.close()


def _prefault(mapping: mmap.mmap) -> None:
    try:
        populate(mapping, MADV_POPULATE_WRITE)
    except OSError:  # older kernel: touch one byte per page instead
        pages = np.frombuffer(mapping, dtype=np.uint8)
        pages[:: mmap.PAGESIZE] = 0
        del pages


def _wipe(mapping: mmap.mmap) -> None:
    """Zero a slice (keeping its pages mapped) so a later check proves the next restore
    wrote every byte."""
    target = np.frombuffer(mapping, dtype=np.uint8)
    target.fill(0)
    del target


def _parallel_memcpy(dest: mmap.mmap, source: np.ndarray, pool: ThreadPoolExecutor,
                     workers: int) -> float:
    """One plain copy of `source` into `dest`, a byte range per pool thread; seconds."""
    with memoryview(dest) as out, memoryview(source.data) as src:
        ranges = split_ranges(len(src), workers)

        def copy_range(span: tuple[int, int]) -> None:
            start, end = span
            with out[start:end] as target, src[start:end] as piece:
                copy_bytes(target, piece)

        started = time.perf_counter()
        list(pool.map(copy_range, ranges))
        return time.perf_counter() - started


def _check_equal(mapping: mmap.mmap, state: np.ndarray, what: str) -> None:
    """Compare in 64 MiB steps: one array_equal over 2 GiB would fault in a 2 GiB
    temporary."""
    restored = np.frombuffer(mapping, dtype=np.uint8)
    step = 64 << 20
    equal = all(np.array_equal(restored[at:at + step], state[at:at + step])
                for at in range(0, len(state), step))
    del restored
    if not equal:
        raise ThawError(f"{what} produced different bytes than the state it restored")
