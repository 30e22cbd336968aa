"""The disk tier: dedupe, LZ4 only where it pays, verification, atomic writes, gc."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from thaw.blobstore import LZ4_MIN_SAVING, DiskTier, digest_of, store_arena
from thaw.core.errors import ChunkNotFound, CorruptChunk, InvalidArgument, ThawError


def weights(nbytes: int, seed: int = 0) -> bytes:
    """Float32 weights: random mantissas, incompressible like a real model's."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(nbytes // 4, dtype=np.float32).tobytes()


def compressible(nbytes: int) -> bytes:
    return (np.arange(nbytes // 4, dtype=np.int32) % 100).tobytes()


def chunk_file(tier: DiskTier, digest: str) -> Path:
    path = tier.path_of(digest)
    assert path is not None
    return path


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def temp_files(tier: DiskTier) -> list[Path]:
    return sorted(tier.root.glob("*/.tmp.*"))


@pytest.fixture
def tier(tmp_path: Path) -> DiskTier:
    return DiskTier(tmp_path / "chunks")


def test_put_get_round_trip(tier: DiskTier) -> None:
    data = weights(64 * 1024)
    stored = tier.put(data)
    assert stored.digest == digest_of(data)
    assert tier.has(stored.digest)
    assert tier.get(stored.digest) == data
    # BLAKE3 chunks are sharded by their hex's first two characters under root/blake3.
    path = chunk_file(tier, stored.digest)
    assert stored.digest.startswith("b3:")
    assert path.parent == tier.root / "blake3" / stored.digest[3:5]
    assert path.name == stored.digest[3:]


def test_same_bytes_are_stored_once(tier: DiskTier) -> None:
    data = weights(64 * 1024)
    first = tier.put(data)
    second = tier.put(bytearray(data))
    assert first == second
    assert list(tier.digests()) == [first.digest]
    assert tier.stored_bytes() == first.stored_length


def test_two_arenas_with_identical_weights_share_their_chunks(tier: DiskTier) -> None:
    shared = weights(8 * 4096, seed=1)
    arena_a = shared + weights(2 * 4096, seed=2)
    arena_b = shared + weights(2 * 4096, seed=3)
    refs_a = store_arena(tier, arena_a, chunk_size=4096)
    after_a = tier.stored_bytes()
    refs_b = store_arena(tier, arena_b, chunk_size=4096)
    assert [r.digest for r in refs_a[:8]] == [r.digest for r in refs_b[:8]]
    assert tier.stored_bytes() == after_a + 2 * 4096  # only b's own chunks were added
    assert len(set(tier.digests())) == 12


def test_lz4_only_where_it_pays(tier: DiskTier) -> None:
    packed = compressible(1 << 20)
    random = weights(1 << 20)
    stored_packed = tier.put(packed)
    stored_random = tier.put(random)
    assert stored_packed.compression == "lz4"
    assert stored_packed.stored_length <= len(packed) * (1 - LZ4_MIN_SAVING)
    assert stored_random.compression == "none"
    assert stored_random.stored_length == len(random)
    assert tier.get(stored_packed.digest) == packed
    assert tier.get(stored_random.digest) == random


def test_a_small_saving_is_not_worth_compressing(tier: DiskTier) -> None:
    # Half random, half zeros: LZ4 saves ~50%. A tenth of zeros saves ~10%: stays raw.
    mostly_random = weights(900 * 1024) + bytes(100 * 1024)
    assert tier.put(mostly_random).compression == "none"
    half = weights(512 * 1024) + bytes(512 * 1024)
    assert tier.put(half).compression == "lz4"


@pytest.mark.parametrize("make", [weights, compressible], ids=["raw", "lz4"])
def test_flipped_byte_on_disk_is_corrupt_chunk_naming_the_digest(
        tier: DiskTier, make: Callable[[int], bytes]) -> None:
    data = make(256 * 1024)
    digest = tier.put(data).digest
    path = chunk_file(tier, digest)
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(CorruptChunk, match=digest):
        tier.get(digest)
    out = memoryview(bytearray(len(data)))
    with pytest.raises(CorruptChunk, match=digest):
        tier.read_into(digest, out)


def test_truncated_chunk_is_corrupt(tier: DiskTier) -> None:
    data = weights(64 * 1024)
    digest = tier.put(data).digest
    path = chunk_file(tier, digest)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptChunk, match=digest):
        tier.get(digest)
    with pytest.raises(CorruptChunk, match=digest):
        tier.read_into(digest, memoryview(bytearray(len(data))))


def test_putting_the_right_bytes_heals_a_corrupt_copy(tier: DiskTier) -> None:
    data = weights(64 * 1024)
    digest = tier.put(data).digest
    flip_byte(chunk_file(tier, digest), 7)
    tier.put(data)
    assert tier.get(digest) == data


def test_absent_chunk_is_not_found(tier: DiskTier) -> None:
    missing = digest_of(b"never stored")
    assert not tier.has(missing)
    with pytest.raises(ChunkNotFound, match=missing):
        tier.get(missing)
    with pytest.raises(ChunkNotFound):
        tier.read_into(missing, memoryview(bytearray(12)))


def test_a_digest_that_is_a_path_is_refused(tier: DiskTier) -> None:
    with pytest.raises(InvalidArgument):
        tier.get("../" * 10 + "etc/passwd")


def test_delete(tier: DiskTier) -> None:
    stored = tier.put(weights(4096))
    assert tier.delete(stored.digest) == stored.stored_length
    assert not tier.has(stored.digest)
    assert tier.delete(stored.digest) == 0


def test_gc_removes_only_unreferenced_chunks(tier: DiskTier) -> None:
    keep = [tier.put(weights(4096, seed=i)) for i in range(3)]
    drop = [tier.put(weights(4096, seed=10 + i)) for i in range(2)]
    drop.append(tier.put(compressible(64 * 1024)))
    result = tier.gc({s.digest for s in keep})
    assert result.removed == len(drop)
    assert result.freed_bytes == sum(s.stored_length for s in drop)
    assert set(tier.digests()) == {s.digest for s in keep}
    for stored in keep:
        assert tier.get(stored.digest)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_gc_removes_temp_files_of_dead_writers_but_not_live_ones(tier: DiskTier) -> None:
    kept = tier.put(weights(4096))
    shard = chunk_file(tier, kept.digest).parent
    dead = shard / f".tmp.{_dead_pid()}.abc"
    dead.write_bytes(b"torn")
    live = shard / f".tmp.{os.getppid()}.abc"  # our parent is alive and may be writing
    live.write_bytes(b"in progress")
    ours_not_writing = shard / f".tmp.{os.getpid()}.abc"
    ours_not_writing.write_bytes(b"left over")

    assert list(tier.digests()) == [kept.digest]  # temp files are not chunks
    assert tier.stored_bytes() == kept.stored_length

    result = tier.gc({kept.digest})
    assert result.removed == 2
    assert result.freed_bytes == len(b"torn") + len(b"left over")
    assert not dead.exists() and not ours_not_writing.exists()
    assert live.exists()
    assert tier.has(kept.digest)


def test_a_failed_rename_leaves_no_chunk_and_no_temp_file(
        tier: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    data = weights(4096)

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("thaw.blobstore.disk.os.replace", crash)
    with pytest.raises(ThawError):
        tier.put(data)
    assert not tier.has(digest_of(data))
    assert temp_files(tier) == []
