"""BLAKE3 chunk addresses beside the SHA-256 ones stores were written with before: new
chunks are BLAKE3-named, old stores keep restoring and verifying, corruption is caught
under either algorithm, and the in-place migration keeps old manifests valid."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import blake3
import lz4.block
import numpy as np
import pytest

from thaw.blobstore import ChunkRef, DiskTier, PinnedTier, restore_arena, store_arena
from thaw.blobstore.__main__ import main as blobstore_main
from thaw.blobstore.chunks import check_digest, digest_of, matches, verify
from thaw.blobstore.migrate import migrate_disk_tier
from thaw.core.errors import CorruptChunk, InvalidArgument

CHUNK = 64 * 1024


def arena_bytes(chunks: int) -> bytes:
    """Half incompressible weights, half zeros: raw and LZ4 chunks both."""
    rng = np.random.default_rng(7)
    parts = []
    for index in range(chunks):
        if index % 2:
            parts.append(bytes(CHUNK))
        else:
            parts.append(rng.standard_normal(CHUNK // 4, dtype=np.float32).tobytes())
    return b"".join(parts)


def write_old_store(root: Path, arena: bytes) -> list[ChunkRef]:
    """Lay chunks out exactly as the disk tier did before BLAKE3: bare SHA-256 hex names
    in `<root>/<hex[:2]>/`, LZ4 blocks (size in front) where that saved a quarter."""
    refs = []
    for offset in range(0, len(arena), CHUNK):
        raw = arena[offset:offset + CHUNK]
        digest = hashlib.sha256(raw).hexdigest()
        compressed = lz4.block.compress(raw, store_size=True)
        lz4_pays = len(compressed) <= len(raw) * 0.75
        payload, compression = (compressed, "lz4") if lz4_pays else (raw, "none")
        shard = root / digest[:2]
        shard.mkdir(parents=True, exist_ok=True)
        (shard / (digest + (".lz4" if lz4_pays else ""))).write_bytes(payload)
        refs.append(ChunkRef(digest=digest, offset=offset, length=len(raw),
                             stored_length=len(payload), compression=compression))
    return refs


def restored(refs: list[ChunkRef], disk: DiskTier, size: int, **kwargs: object) -> bytes:
    out = bytearray(size)
    restore_arena(refs, out, disk=disk, **kwargs)  # type: ignore[arg-type]
    return bytes(out)


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture
def old_store(tmp_path: Path) -> tuple[DiskTier, list[ChunkRef], bytes]:
    arena = arena_bytes(6)
    refs = write_old_store(tmp_path / "chunks", arena)
    return DiskTier(tmp_path / "chunks"), refs, arena


def test_new_chunks_are_named_by_blake3(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "chunks")
    arena = arena_bytes(4)
    refs = store_arena(disk, arena, chunk_size=CHUNK)
    for ref in refs:
        raw = arena[ref.offset:ref.end]
        assert ref.digest == "b3:" + blake3.blake3(raw).hexdigest()
        assert disk.get(ref.digest) == raw
    assert {ref.compression for ref in refs} == {"none", "lz4"}
    assert not list((tmp_path / "chunks").glob("[0-9a-f][0-9a-f]"))  # no SHA-256 shard


def test_digest_forms() -> None:
    data = b"weights"
    sha = hashlib.sha256(data).hexdigest()
    assert matches(sha, data) and matches(digest_of(data), data)
    assert not matches(sha, b"other") and not matches(digest_of(data), b"other")
    for bad in ("sha256:" + sha, "b3:" + sha.upper(), "b3:" + sha[:-1], "b3:../" + sha[3:]):
        with pytest.raises(InvalidArgument):
            check_digest(bad)
    with pytest.raises(CorruptChunk, match=sha):
        verify(sha, b"other")


def test_an_old_store_restores_and_verifies(
        old_store: tuple[DiskTier, list[ChunkRef], bytes]) -> None:
    disk, refs, arena = old_store
    assert restored(refs, disk, len(arena)) == arena
    for ref in refs:
        assert disk.get(ref.digest) == arena[ref.offset:ref.end]
    pinned = PinnedTier(1 << 22)
    pinned.prewarm(refs, disk)
    assert restored(refs, disk, len(arena), pinned=pinned) == arena
    assert pinned.get(refs[0].digest) == arena[:CHUNK]


@pytest.mark.parametrize("which", [0, 1], ids=["raw", "lz4"])
def test_corruption_is_caught_under_either_algorithm(
        old_store: tuple[DiskTier, list[ChunkRef], bytes], tmp_path: Path, which: int) -> None:
    disk, refs, arena = old_store
    new_disk = DiskTier(tmp_path / "new")
    new_refs = store_arena(new_disk, arena, chunk_size=CHUNK)
    for tier, ref in ((disk, refs[which]), (new_disk, new_refs[which])):
        path = tier.path_of(ref.digest)
        assert path is not None
        flip(path)
        with pytest.raises(CorruptChunk, match=f"chunk {ref.digest}"):
            tier.get(ref.digest)
        with pytest.raises(CorruptChunk, match=f"chunk {ref.digest}"):
            restored([ref], tier, ref.end)


def test_migration_aliases_old_chunks_without_copying(
        old_store: tuple[DiskTier, list[ChunkRef], bytes]) -> None:
    disk, refs, arena = old_store
    before = disk.stored_bytes()
    inodes = {ref.digest: os.stat(disk.path_of(ref.digest) or "").st_ino for ref in refs}

    report = migrate_disk_tier(disk, workers=2)
    distinct = len({ref.digest for ref in refs})
    assert (report.migrated, report.already, report.corrupt) == (distinct, 0, [])

    for ref in refs:
        raw = arena[ref.offset:ref.end]
        key = digest_of(raw)
        assert disk.is_alias(ref.digest)
        new_path = disk.path_of(key)
        assert new_path is not None and new_path.stat().st_ino == inodes[ref.digest]
        assert disk.get(key) == raw and disk.get(ref.digest) == raw
    # The old manifest still restores, and storing the same bytes again writes nothing.
    assert restored(refs, disk, len(arena)) == arena
    assert [r.digest for r in store_arena(disk, arena, chunk_size=CHUNK)] == \
        [digest_of(arena[r.offset:r.end]) for r in refs]
    assert disk.stored_bytes() == before

    again = migrate_disk_tier(disk)
    assert (again.migrated, again.already) == (0, distinct)


def test_a_migrated_chunk_is_verified_with_blake3_and_named_by_its_old_digest(
        old_store: tuple[DiskTier, list[ChunkRef], bytes]) -> None:
    disk, refs, arena = old_store
    migrate_disk_tier(disk)
    ref = refs[0]
    target = disk.path_of(digest_of(arena[:CHUNK]))
    assert target is not None
    flip(target)
    with pytest.raises(CorruptChunk, match=f"chunk {ref.digest} is corrupt"):
        restored([ref], disk, ref.end)
    # A good copy (a peer's) heals it under both names.
    disk.put(arena[:CHUNK], ref.digest)
    assert restored([ref], disk, ref.end) == arena[:CHUNK]
    assert disk.get(digest_of(arena[:CHUNK])) == arena[:CHUNK]


def test_gc_keeps_a_blake3_file_while_its_alias_is_referenced(
        old_store: tuple[DiskTier, list[ChunkRef], bytes]) -> None:
    disk, refs, arena = old_store
    migrate_disk_tier(disk)
    referenced = {ref.digest for ref in refs}
    assert disk.gc(referenced).removed == 0
    assert restored(refs, disk, len(arena)) == arena
    result = disk.gc(set())
    assert result.removed == 2 * len(referenced)  # each alias and its file
    assert list(disk.digests()) == []


def test_a_refetched_old_chunk_is_stored_under_blake3_with_its_alias(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "chunks")
    raw = arena_bytes(1)
    sha = hashlib.sha256(raw).hexdigest()
    with pytest.raises(CorruptChunk):
        disk.put(raw + b"x", sha)
    assert disk.put(raw, sha).digest == sha
    assert disk.is_alias(sha) and disk.get(sha) == raw and disk.has(digest_of(raw))


def test_migration_leaves_a_corrupt_chunk_for_repair_and_says_so(
        old_store: tuple[DiskTier, list[ChunkRef], bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    disk, refs, _ = old_store
    path = disk.path_of(refs[0].digest)
    assert path is not None
    flip(path)
    assert blobstore_main(["migrate", str(disk.root)]) == 1
    out = capsys.readouterr().out
    assert f'"corrupt": ["{refs[0].digest}"]' in out
    assert not disk.is_alias(refs[0].digest) and disk.is_alias(refs[2].digest)


def test_the_pipeline_restores_what_a_serial_restore_does(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "chunks")
    arena = arena_bytes(9)
    refs = store_arena(disk, arena, chunk_size=CHUNK, workers=4)
    assert refs == store_arena(disk, arena, chunk_size=CHUNK, workers=1)
    serial = restored(refs, disk, len(arena), workers=1)
    parallel = restored(refs, disk, len(arena), workers=4)
    assert serial == parallel == arena
