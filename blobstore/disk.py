"""The disk tier: content-addressed chunk files, written atomically, verified on every read.

Layout: `<root>/blake3/<hex[:2]>/<hex>` for a raw chunk named `b3:<hex>` (BLAKE3), `<hex>.lz4`
for a compressed one (an LZ4 block with its raw size in front). A raw file holds exactly the
chunk's bytes, so a restore reads it straight into its destination. Files only ever appear
under their final name by `rename` of a fsynced temp file, so a reader never sees a torn
chunk; a writer that dies leaves a `.tmp.<pid>.<token>` file behind, which `gc` removes.

Chunks written before BLAKE3 are named by their bare SHA-256 hex and sit at
`<root>/<hex[:2]>/<hex>`: they are read and verified with SHA-256 as long as they stay
there. Migrating one (`DiskTier.migrate`, `python -m thaw.blobstore migrate`) hard-links
its file to its BLAKE3 name and turns the old name into a symlink to it (an alias), so
manifests naming the SHA-256 keep restoring, now verified with BLAKE3.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import threading
import time
from collections.abc import Callable, Container, Iterator
from pathlib import Path
from typing import NamedTuple

import lz4.block

from thaw.core.errors import ChunkNotFound, CorruptChunk, ThawError

from .chunks import (
    BLAKE3_PREFIX,
    BytesLike,
    Compression,
    algorithm_of,
    as_byte_view,
    check_digest,
    digest_of,
    hex_of,
    matches,
    sha256_digest_of,
    verify,
)
from .copying import copy_bytes
from .direct import DirectRefused, is_cached, read_direct

# Keep a chunk LZ4-compressed only when that saves at least a quarter of its bytes.
# Measured here (Xeon, 4 MiB chunks, one core): LZ4 decompresses ~8-10 GB/s. Assumed: a
# local NVMe reads ~3 GB/s cold. A compressed chunk then reads faster only if
# saving/3 > 1/8, i.e. a saving over ~0.35 cold, and never from a warm page cache; under
# ~25% the disk space saved is not worth decompressing on every restore. Float weights
# save ~0% (random mantissas) and stay raw; zero pages, padding and integer tables save
# 90%+ and are compressed.
LZ4_MIN_SAVING = 0.25

# A temp file this old is stale even if a process with its writer's pid is alive (pids
# get reused); a chunk write takes milliseconds, so an hour is far beyond any real one.
STALE_TEMP_SECONDS = 3600.0

_TEMP_PREFIX = ".tmp."
_LZ4_SUFFIX = ".lz4"
# The folder under the root that holds BLAKE3-named chunks; SHA-256 shards sit beside it
# (not a hex name, so it can never be mistaken for one of them).
_BLAKE3_DIR = "blake3"
_HEX = frozenset("0123456789abcdef")

# Temp files this process is writing right now, by path: process-wide, because two
# DiskTier objects on one root (agent and CLI in one process, tests) must not gc each
# other's writes in flight.
_WRITING: set[str] = set()
_WRITING_LOCK = threading.Lock()


class StoredChunk(NamedTuple):
    """What `DiskTier.put` stored (or found already stored)."""

    digest: str
    stored_length: int
    compression: Compression


class _Found(NamedTuple):
    """Where a chunk's file is, and the digest its bytes are verified against: the
    chunk's own, or for a migrated SHA-256 chunk the BLAKE3 digest its alias points to."""

    path: Path
    compression: Compression
    key: str


class GcResult(NamedTuple):
    """What `DiskTier.gc` deleted: unreferenced chunks plus stale temp files."""

    removed: int
    freed_bytes: int


class DiskTier:
    """Chunk files under `root`, keyed by the digest of their raw bytes (module docstring).

    Thread-safe and safe across processes sharing `root` (every change is a rename or an
    unlink). `gc` must not race with a `put` whose manifest is not yet in `referenced`:
    the caller serialises the two.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Cleared the first time the filesystem refuses O_DIRECT (tmpfs): buffered then.
        self._direct_reads = True

    # -- writing ---------------------------------------------------------------------

    def put(self, data: BytesLike, digest: str | None = None) -> StoredChunk:
        """Store `data` once under its BLAKE3 digest; storing the same bytes again writes
        nothing. An existing copy is verified first and rewritten if it is corrupt, so
        putting the right bytes heals a damaged chunk.

        With `digest` the bytes must hash to it (else CorruptChunk); a SHA-256 `digest`
        (a chunk of a snapshot written before BLAKE3, fetched again from a peer) is
        stored under BLAKE3 with the SHA-256 name as an alias, and answered under it.
        """
        raw = as_byte_view(data)
        key = digest_of(raw)
        if digest is None or digest == key:
            return self._put_blake3(raw, key)
        if algorithm_of(check_digest(digest)) == "blake3":
            raise CorruptChunk(f"chunk {digest} is corrupt: its bytes hash to {key}")
        actual = sha256_digest_of(raw)
        if actual != digest:
            raise CorruptChunk(f"chunk {digest} is corrupt: its bytes hash to {actual}")
        stored = self._put_blake3(raw, key)
        self._alias(digest, key, stored.compression)
        return StoredChunk(digest, stored.stored_length, stored.compression)

    def _put_blake3(self, raw: memoryview, digest: str) -> StoredChunk:
        found = self._locate(digest)
        if found is not None:
            try:
                self._read_verified(digest, found)
                return StoredChunk(digest, found.path.stat().st_size, found.compression)
            except (CorruptChunk, ChunkNotFound):
                pass  # rewrite it below
        payload, compression = _encode(raw)
        final = self._path(digest, compression)
        self._write_atomic(final, payload)
        # A corrupt copy in the other encoding would shadow or duplicate this one.
        stale = self._path(digest, "lz4" if compression == "none" else "none")
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
        return StoredChunk(digest, len(payload), compression)

    def delete(self, digest: str) -> int:
        """Remove a chunk's name; returns the bytes freed (0 if it was absent). For a
        migrated SHA-256 chunk only the alias goes: its BLAKE3 file may have other names,
        and `gc` removes it once none is referenced."""
        freed = 0
        for compression in ("none", "lz4"):
            path = self._path(check_digest(digest), compression)
            try:
                size = path.lstat().st_size
                path.unlink()
                freed += size
            except FileNotFoundError:
                continue
        return freed

    def gc(self, referenced: Container[str]) -> GcResult:
        """Delete every chunk not in `referenced` (a BLAKE3 file is kept while a
        referenced SHA-256 alias points to it), and temp files no live writer owns."""
        removed = freed = 0
        now = time.time()
        aliased: set[str] = set()
        for shard, blake3 in self._shards():
            if blake3:
                continue
            for entry in _scandir(shard):
                digest = _digest_from_name(entry.name, blake3)
                if digest is not None and digest in referenced and entry.is_symlink():
                    aliased.add(self._key_of(digest, Path(entry.path)))
        for shard, blake3 in self._shards():
            for entry in _scandir(shard):
                name = entry.name
                digest = _digest_from_name(name, blake3)
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                    if name.startswith(_TEMP_PREFIX):
                        if not self._temp_is_stale(entry, now):
                            continue
                    elif digest is None:
                        continue  # not ours: leave it alone
                    elif digest in referenced or digest in aliased:
                        continue
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # deleted under us: nothing to free
                removed += 1
                freed += size
        return GcResult(removed, freed)

    # -- reading ---------------------------------------------------------------------

    def has(self, digest: str) -> bool:
        return self._locate(check_digest(digest)) is not None

    def get(self, digest: str) -> bytes:
        """The chunk's raw bytes, verified against `digest`.

        Raises ChunkNotFound if absent, CorruptChunk naming the digest if its bytes
        (or its LZ4 framing) are damaged.
        """
        found = self._locate(check_digest(digest))
        if found is None:
            raise ChunkNotFound(f"chunk {digest} is not on disk")
        return self._read_verified(digest, found)

    def read_into(self, digest: str, out: memoryview) -> None:
        """Fill `out` (exactly the chunk's raw length) with the chunk's verified bytes.

        A raw chunk is read straight into `out` and hashed there, saving a copy; on
        CorruptChunk or ChunkNotFound `out` holds garbage and the caller must not use it.
        """
        found = self._locate(check_digest(digest))
        if found is None:
            raise ChunkNotFound(f"chunk {digest} is not on disk")
        if found.compression == "lz4":
            raw = self._read_verified(digest, found)
            if len(raw) != len(out):
                raise CorruptChunk(f"chunk {digest} is {len(raw)} bytes, expected {len(out)}")
            copy_bytes(out, raw)
            return
        try:
            with open(found.path, "rb", buffering=0) as file:
                size = os.fstat(file.fileno()).st_size
                if size != len(out):
                    raise CorruptChunk(f"chunk {digest} is {size} bytes on disk, "
                                       f"expected {len(out)}")
                filled = 0
                if self._direct_reads and not is_cached(file.fileno(), size):
                    filled = self._read_direct(found.path, out)
                _read_exactly(file, out, digest, filled)
        except FileNotFoundError as exc:
            raise ChunkNotFound(f"chunk {digest} is not on disk") from exc
        except OSError as exc:
            raise ThawError(f"reading chunk {digest}: {exc}") from exc
        _verify_as(digest, found.key, out)

    def _read_direct(self, path: Path, out: memoryview) -> int:
        """Read a chunk the page cache does not hold with O_DIRECT: straight from the
        device into `out`, no page cache copy, no readahead guessing. Returns the bytes
        of `out` filled; the unaligned tail (and everything, where O_DIRECT is refused)
        is left to a buffered read."""
        try:
            return read_direct(path, out)
        except DirectRefused:
            self._direct_reads = False
            return 0

    def stat(self, digest: str) -> StoredChunk:
        """How a chunk is stored, without reading it."""
        found = self._locate(check_digest(digest))
        if found is None:
            raise ChunkNotFound(f"chunk {digest} is not on disk")
        try:
            return StoredChunk(digest, found.path.stat().st_size, found.compression)
        except FileNotFoundError as exc:
            raise ChunkNotFound(f"chunk {digest} is not on disk") from exc

    def digests(self) -> Iterator[str]:
        """Every stored chunk's digest, SHA-256 aliases included (temp files are not
        chunks)."""
        for shard, blake3 in self._shards():
            for entry in _scandir(shard):
                digest = _digest_from_name(entry.name, blake3)
                if digest is not None:
                    yield digest

    def is_alias(self, digest: str) -> bool:
        """Whether a SHA-256 chunk has been migrated: its name points to a BLAKE3 file."""
        if algorithm_of(check_digest(digest)) == "blake3":
            return False
        return any(self._path(digest, compression).is_symlink()
                   for compression in ("none", "lz4"))

    def stored_bytes(self) -> int:
        """Bytes the chunks take on disk (after compression; temp files and aliases
        excluded, a hard-linked file counted under each of its names)."""
        total = 0
        for shard, blake3 in self._shards():
            for entry in _scandir(shard):
                if _digest_from_name(entry.name, blake3) is not None:
                    with contextlib.suppress(FileNotFoundError):
                        if not entry.is_symlink():
                            total += entry.stat(follow_symlinks=False).st_size
        return total

    # -- internals -------------------------------------------------------------------

    def path_of(self, digest: str) -> Path | None:
        """The file a stored chunk is read from (an alias's own name for a migrated
        SHA-256 chunk), or None if it is absent."""
        found = self._locate(check_digest(digest))
        return None if found is None else found.path

    def _path(self, digest: str, compression: Compression) -> Path:
        hexdigest = hex_of(digest)
        name = hexdigest + (_LZ4_SUFFIX if compression == "lz4" else "")
        if algorithm_of(digest) == "blake3":
            return self.root / _BLAKE3_DIR / hexdigest[:2] / name
        return self.root / hexdigest[:2] / name

    def _locate(self, digest: str) -> _Found | None:
        for compression in ("none", "lz4"):
            path = self._path(digest, compression)
            if path.exists():  # follows an alias; a dangling one is absent
                return _Found(path, compression, self._key_of(digest, path))
        return None

    def _key_of(self, digest: str, path: Path) -> str:
        """The digest `path`'s bytes are verified against: a SHA-256 alias names its
        BLAKE3 file, whose digest binds the same bytes (checked when it was made)."""
        if algorithm_of(digest) == "blake3":
            return digest
        try:
            target = os.readlink(path)
        except OSError:
            return digest  # a plain file: not migrated
        key = _digest_from_name(os.path.basename(target), blake3=True)
        return digest if key is None else key

    def _alias(self, digest: str, key: str, compression: Compression) -> None:
        """Point the SHA-256 name `digest` at the BLAKE3 file of `key` (atomically, over
        whatever file or alias had that name)."""
        final = self._path(digest, compression)
        target = os.path.relpath(self._path(key, compression), final.parent)
        self._replace_with(final, lambda temp: os.symlink(target, temp))
        stale = self._path(digest, "lz4" if compression == "none" else "none")
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()

    def migrate(self, digest: str) -> bool:
        """Give the SHA-256 chunk `digest` its BLAKE3 name: its verified bytes' file is
        hard-linked there (no copy) and the old name becomes an alias of it. Returns
        False if it was migrated already. CorruptChunk / ChunkNotFound leave it as it
        was (a restore then repairs it from a peer)."""
        if algorithm_of(check_digest(digest)) == "blake3" or self.is_alias(digest):
            return False
        found = self._locate(digest)
        if found is None:
            raise ChunkNotFound(f"chunk {digest} is not on disk")
        key = digest_of(self._read_verified(digest, found))
        existing = self._locate(key)
        if existing is not None:
            with contextlib.suppress(CorruptChunk, ChunkNotFound):
                self._read_verified(key, existing)
                self._alias(digest, key, existing.compression)
                return True
        self._replace_with(self._path(key, found.compression),
                           lambda temp: os.link(found.path, temp))
        self._alias(digest, key, found.compression)
        return True

    def _read_verified(self, digest: str, found: _Found) -> bytes:
        compression = found.compression
        try:
            stored = found.path.read_bytes()
        except FileNotFoundError as exc:
            raise ChunkNotFound(f"chunk {digest} is not on disk") from exc
        except OSError as exc:
            raise ThawError(f"reading chunk {digest}: {exc}") from exc
        raw: bytes
        if compression == "lz4":
            try:
                raw = lz4.block.decompress(stored)
            except lz4.block.LZ4BlockError as exc:
                raise CorruptChunk(f"chunk {digest} is corrupt: bad LZ4 block") from exc
        else:
            raw = stored
        _verify_as(digest, found.key, raw)
        return raw

    def _write_atomic(self, final: Path, payload: BytesLike) -> None:

        def write(temp: Path) -> None:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, as_byte_view(payload))
                os.fsync(fd)
            finally:
                os.close(fd)

        self._replace_with(final, write)

    def _replace_with(self, final: Path, make: Callable[[Path], None]) -> None:
        """Make a temp entry beside `final` with `make(temp)` and rename it over `final`,
        so `final` is never seen half made, and the rename survives a crash."""
        shard = final.parent
        if not shard.is_dir():
            shard.mkdir(parents=True, exist_ok=True)
            # The new shard's own entry (and the blake3 folder's) must survive a crash too.
            _fsync_dir(shard.parent)
            if shard.parent != self.root:
                _fsync_dir(self.root)
        temp = shard / f"{_TEMP_PREFIX}{os.getpid()}.{secrets.token_hex(6)}"
        with _WRITING_LOCK:
            _WRITING.add(str(temp))
        try:
            make(temp)
            os.replace(temp, final)
            _fsync_dir(shard)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise ThawError(f"writing chunk {final.name}: {exc}") from exc
        finally:
            with _WRITING_LOCK:
                _WRITING.discard(str(temp))

    def _temp_is_stale(self, entry: os.DirEntry[str], now: float) -> bool:
        if now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
            return True
        try:
            pid = int(entry.name[len(_TEMP_PREFIX):].split(".", 1)[0])
        except ValueError:
            return True
        if pid == os.getpid():
            with _WRITING_LOCK:
                return str(Path(entry.path)) not in _WRITING
        return not _pid_alive(pid)

    def _shards(self) -> Iterator[tuple[Path, bool]]:
        """Every shard folder, and whether it holds BLAKE3 chunks (else SHA-256 ones)."""
        for parent, blake3 in ((self.root, False), (self.root / _BLAKE3_DIR, True)):
            for entry in _scandir(parent):
                if (len(entry.name) == 2 and _HEX.issuperset(entry.name)
                        and entry.is_dir(follow_symlinks=False)):
                    yield Path(entry.path), blake3


def _encode(raw: memoryview) -> tuple[BytesLike, Compression]:
    # lz4 releases the GIL, so store_arena compresses chunks on all cores.
    compressed = lz4.block.compress(raw, store_size=True)
    if len(compressed) <= len(raw) * (1.0 - LZ4_MIN_SAVING):
        return compressed, "lz4"
    return raw, "none"


def _digest_from_name(name: str, blake3: bool) -> str | None:
    """The digest a chunk file in a BLAKE3 or SHA-256 shard is named for, or None for a
    file that is not a chunk."""
    hexdigest = name.removesuffix(_LZ4_SUFFIX)
    if len(hexdigest) != 64 or not _HEX.issuperset(hexdigest):
        return None
    return BLAKE3_PREFIX + hexdigest if blake3 else hexdigest


def _verify_as(digest: str, key: str, data: BytesLike) -> None:
    """Verify `data` against `key`, naming `digest` (the chunk a manifest asked for) in
    the error, so a repair finds the chunk by the name its snapshot uses."""
    if key == digest:
        verify(digest, data)
    elif not matches(key, data):
        raise CorruptChunk(f"chunk {digest} is corrupt: its bytes no longer hash to {key}, "
                           f"the BLAKE3 digest it was migrated to")


def _scandir(path: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            yield from entries
    except FileNotFoundError:
        return


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exactly(file: io.FileIO, out: memoryview, digest: str, filled: int = 0) -> None:
    """Fill `out[filled:]` from the file's offset `filled` on."""
    if filled:
        file.seek(filled)
    while filled < len(out):
        count = file.readinto(out[filled:])
        if not count:
            raise CorruptChunk(f"chunk {digest} is truncated at {filled} bytes")
        filled += count


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True
