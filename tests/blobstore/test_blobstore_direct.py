"""Cold chunks are read with O_DIRECT straight into the destination, cached ones from the
page cache, and either way the restore writes the same verified bytes; filesystems and
buffers O_DIRECT refuses fall back to buffered reads."""

from __future__ import annotations

import errno
import json
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import thaw.blobstore.disk as disk_module
from thaw.bench.disk_restore import run_disk_restore_bench
from thaw.blobstore import ChunkRef, DiskTier, restore_arena, store_arena
from thaw.blobstore.direct import DirectRefused, is_cached, read_direct
from thaw.core.errors import CorruptChunk

CHUNK = 256 * 1024


def weights(size: int) -> bytes:
    return np.random.default_rng(3).standard_normal(-(-size // 4), dtype=np.float32) \
        .tobytes()[:size]


def drop_cache(disk: DiskTier, refs: list[ChunkRef]) -> None:
    for ref in refs:
        path = disk.path_of(ref.digest)
        assert path is not None
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture
def direct_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bytes each O_DIRECT read filled, as the disk tier made them."""
    filled: list[int] = []

    def counting(path: Path, out: memoryview) -> int:
        count = read_direct(path, out)
        filled.append(count)
        return count

    monkeypatch.setattr(disk_module, "read_direct", counting)
    yield filled


def o_direct_works(folder: Path) -> bool:
    probe = folder / "probe"
    probe.write_bytes(bytes(4096))
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def test_a_cold_chunk_is_read_direct_and_verified(tmp_path: Path,
                                                  direct_reads: list[int]) -> None:
    if not o_direct_works(tmp_path):
        pytest.skip("the temp dir's filesystem refuses O_DIRECT")
    disk = DiskTier(tmp_path / "chunks")
    arena = weights(3 * CHUNK + 1000)  # a tail chunk that is not block-aligned
    refs = store_arena(disk, arena, chunk_size=CHUNK)
    drop_cache(disk, refs)
    with mmap.mmap(-1, len(arena)) as dest:
        restore_arena(refs, dest, disk=disk, workers=2)
        assert dest[:] == arena
    # Every chunk was read straight from the device, the tail's last partial block too
    # (buffered: O_DIRECT only takes whole blocks).
    assert sorted(direct_reads) == sorted([CHUNK] * 3 + [1000 // 4096 * 4096])

    direct_reads.clear()
    with mmap.mmap(-1, len(arena)) as dest:
        restore_arena(refs, dest, disk=disk, workers=2)
        assert dest[:] == arena
    # The tail's buffered read cached its last page; the O_DIRECT reads cached nothing.
    assert len(direct_reads) == 3


def test_a_cached_chunk_is_read_from_the_page_cache(tmp_path: Path,
                                                    direct_reads: list[int]) -> None:
    disk = DiskTier(tmp_path / "chunks")
    arena = weights(2 * CHUNK)
    refs = store_arena(disk, arena, chunk_size=CHUNK)  # written: in the page cache
    path = disk.path_of(refs[0].digest)
    assert path is not None
    with open(path, "rb") as file:
        file.read()
        assert is_cached(file.fileno(), CHUNK)
    out = bytearray(len(arena))
    restore_arena(refs, out, disk=disk)
    assert out == arena and direct_reads == []


def test_corruption_is_caught_on_the_direct_path(tmp_path: Path,
                                                 direct_reads: list[int]) -> None:
    if not o_direct_works(tmp_path):
        pytest.skip("the temp dir's filesystem refuses O_DIRECT")
    disk = DiskTier(tmp_path / "chunks")
    arena = weights(2 * CHUNK)
    refs = store_arena(disk, arena, chunk_size=CHUNK)
    path = disk.path_of(refs[1].digest)
    assert path is not None
    data = bytearray(path.read_bytes())
    data[CHUNK // 2] ^= 0x01
    with open(path, "wb") as file:
        file.write(data)
        os.fsync(file.fileno())
    drop_cache(disk, refs)
    with mmap.mmap(-1, len(arena)) as dest, \
            pytest.raises(CorruptChunk, match=f"chunk {refs[1].digest}"):
        restore_arena(refs, dest, disk=disk, workers=1, reads_in_flight=1)
    assert CHUNK in direct_reads


def test_an_unaligned_destination_is_read_buffered(tmp_path: Path) -> None:
    path = tmp_path / "chunk"
    path.write_bytes(weights(CHUNK))
    backing = bytearray(CHUNK + 1)
    with memoryview(backing) as whole, whole[1:] as out:
        assert read_direct(path, out) == 0


def test_a_filesystem_that_refuses_o_direct_is_read_buffered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As tmpfs did before Linux 6.6 (and some FUSE filesystems still do): EINVAL."""
    real_open = os.open
    refused: list[str] = []

    def no_direct(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            refused.append(str(path))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    disk = DiskTier(tmp_path / "chunks")
    arena = weights(3 * CHUNK)
    refs = store_arena(disk, arena, chunk_size=CHUNK)
    drop_cache(disk, refs)
    monkeypatch.setattr(os, "open", no_direct)
    with mmap.mmap(-1, CHUNK) as page_aligned, memoryview(page_aligned) as out:
        path = disk.path_of(refs[0].digest)
        assert path is not None
        with pytest.raises(DirectRefused):
            read_direct(path, out)
    with mmap.mmap(-1, len(arena)) as dest:
        restore_arena(refs, dest, disk=disk, workers=1, reads_in_flight=1)
        assert dest[:] == arena
    assert not disk._direct_reads
    assert len(refused) == 2  # the probe above and the tier's first try, then no more


def test_the_cold_disk_bench_reports_every_figure(tmp_path: Path) -> None:
    if not o_direct_works(tmp_path):
        pytest.skip("the temp dir's filesystem refuses O_DIRECT (dd iflag=direct)")
    result = run_disk_restore_bench(3 * (1 << 20) + 4096, workers=2, directory=tmp_path,
                                    chunk_size=1 << 20, rounds=1)
    assert set(result) == {"bytes", "tier", "cold", "restore_gbps", "device_gbps", "ratio",
                           "sha256_restore_gbps", "sha256_ratio", "verify_blake3_gbps",
                           "verify_sha256_gbps", "workers", "chunk_size", "load_average"}
    for key in ("restore_gbps", "device_gbps", "ratio", "sha256_restore_gbps",
                "verify_blake3_gbps", "verify_sha256_gbps"):
        assert isinstance(result[key], float) and result[key] > 0
    assert json.loads(json.dumps(result)) == result
    assert list(tmp_path.iterdir()) == [tmp_path / "probe"]  # its scratch is gone
