"""`thaw bench restore --tier disk --cold`: a restore from the disk tier with the page
cache cold, against the device's own sequential read measured in the same run.

One run, same filesystem, same size: an incompressible state is stored as chunks
(BLAKE3-addressed, as thaw writes them now) and, beside it, as a store written the way
thaw did before BLAKE3 (bare SHA-256 names, verified with SHA-256 on read); the page
cache is dropped for every chunk file (fsync'd, then POSIX_FADV_DONTNEED: only these
files, nothing of the neighbours'), and each store is restored into a host slice, timed
around the whole `restore_arena` call. The reference is `dd iflag=direct` (O_DIRECT,
no page cache) reading a file of the same size on the same filesystem, sequentially in
chunk-sized blocks. Verification speed of each hash over the same bytes in memory, on
the same threads, is printed beside them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import blake3
import numpy as np

from thaw.blobstore import CHUNK_SIZE, ChunkRef, DiskTier, restore_arena, store_arena
from thaw.blobstore.bounded import resolve_workers, run_bounded
from thaw.core.errors import InvalidArgument, ThawError

from .restore import _check_equal, _host_slice, _wipe, incompressible_state

# Cold restores of each store; the best is kept (each pays a full cold read).
ROUNDS = 2


def run_disk_restore_bench(size_bytes: int, workers: int | None = None, *,
                           directory: Path | None = None, chunk_size: int = CHUNK_SIZE,
                           rounds: int = ROUNDS) -> dict[str, object]:
    """Measure a cold disk-tier restore vs the device's O_DIRECT sequential read; returns
    the `thaw bench restore --tier disk --cold` object (rates in GB/s, 1e9 bytes/s)."""
    if not isinstance(size_bytes, int) or size_bytes < 1:
        raise InvalidArgument(f"size must be a positive number of bytes, got {size_bytes!r}",
                              field="size")
    if rounds < 1:
        raise InvalidArgument(f"rounds must be >= 1, got {rounds!r}", field="rounds")
    if shutil.which("dd") is None:
        raise ThawError("dd is not installed: it measures the device's read bandwidth")
    threads = resolve_workers(workers)
    state = incompressible_state(size_bytes)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="thaw-bench-disk-", dir=directory)))
        disk = DiskTier(scratch / "chunks")
        refs = store_arena(disk, state.data, chunk_size, threads)
        old_refs = _store_the_old_way(disk, state, chunk_size, threads)
        raw_file = scratch / "sequential"
        _write_file(raw_file, state.data)
        dest = stack.enter_context(_host_slice(size_bytes, scratch))

        blake3_best = sha256_best = device_best = float("inf")
        for _ in range(rounds):
            device_best = min(device_best, _dd_direct(raw_file, chunk_size))
            for which in ("blake3", "sha256"):
                chosen = refs if which == "blake3" else old_refs
                _drop_cache(disk, chosen)
                _wipe(dest)
                started = time.perf_counter()
                stats = restore_arena(chosen, dest, disk=disk, workers=threads)
                seconds = time.perf_counter() - started
                if stats.from_disk_bytes != size_bytes:
                    raise ThawError(f"{which} restore read {stats.from_disk_bytes} of "
                                    f"{size_bytes} bytes from disk")
                _check_equal(dest, state, f"cold {which} disk restore")
                if which == "blake3":
                    blake3_best = min(blake3_best, seconds)
                else:
                    sha256_best = min(sha256_best, seconds)
        verify_blake3, verify_sha256 = _verify_rates(state, chunk_size, threads)

    restore_gbps = size_bytes / blake3_best / 1e9
    sha256_gbps = size_bytes / sha256_best / 1e9
    device_gbps = size_bytes / device_best / 1e9
    return {
        "bytes": size_bytes,
        "tier": "disk",
        "cold": True,
        "restore_gbps": round(restore_gbps, 3),
        "device_gbps": round(device_gbps, 3),
        "ratio": round(restore_gbps / device_gbps, 3),
        "sha256_restore_gbps": round(sha256_gbps, 3),
        "sha256_ratio": round(sha256_gbps / device_gbps, 3),
        "verify_blake3_gbps": round(verify_blake3, 3),
        "verify_sha256_gbps": round(verify_sha256, 3),
        "workers": threads,
        "chunk_size": chunk_size,
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


def _store_the_old_way(disk: DiskTier, state: np.ndarray, chunk_size: int,
                       threads: int) -> list[ChunkRef]:
    """The same state as chunks named by bare SHA-256 in the SHA-256 shards, as every
    store was written before BLAKE3 (raw: incompressible weights never pay LZ4)."""
    view = memoryview(state.data)
    spans = [(at, min(at + chunk_size, len(view))) for at in range(0, len(view), chunk_size)]

    def write(span: tuple[int, int]) -> ChunkRef:
        start, end = span
        piece = view[start:end]
        digest = hashlib.sha256(piece).hexdigest()
        shard = disk.root / digest[:2]
        shard.mkdir(exist_ok=True)
        _write_file(shard / digest, piece)
        return ChunkRef(digest=digest, offset=start, length=end - start,
                        stored_length=end - start)

    return run_bounded(write, spans, threads)


def _write_file(path: Path, data: memoryview) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _drop_cache(disk: DiskTier, refs: list[ChunkRef]) -> None:
    """Evict exactly these chunk files from the page cache (they are fsync'd: clean
    pages, which DONTNEED drops)."""
    for ref in refs:
        path = disk.path_of(ref.digest)
        if path is None:
            raise ThawError(f"chunk {ref.digest} vanished from the bench's store")
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _dd_direct(path: Path, block: int) -> float:
    """Seconds for `dd iflag=direct` to read `path` sequentially (no page cache)."""
    command = ["dd", f"if={path}", "of=/dev/null", f"bs={block}", "iflag=direct"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise ThawError(f"dd iflag=direct failed (a filesystem without O_DIRECT, such as "
                        f"tmpfs? pick another with --dir): {done.stderr.strip()}")
    return seconds


def _verify_rates(state: np.ndarray, chunk_size: int, threads: int) -> tuple[float, float]:
    """GB/s of BLAKE3 and of SHA-256 hashing the state chunk by chunk on `threads`
    threads, in memory: what each costs a restore beyond the reads."""
    view = memoryview(state.data)
    spans = [(at, min(at + chunk_size, len(view))) for at in range(0, len(view), chunk_size)]

    def with_blake3(span: tuple[int, int]) -> bytes:
        return blake3.blake3(view[span[0]:span[1]]).digest()

    def with_sha256(span: tuple[int, int]) -> bytes:
        return hashlib.sha256(view[span[0]:span[1]]).digest()

    rates = []
    for hash_span in (with_blake3, with_sha256):
        started = time.perf_counter()
        run_bounded(hash_span, spans, threads)
        rates.append(len(view) / (time.perf_counter() - started) / 1e9)
    return rates[0], rates[1]
