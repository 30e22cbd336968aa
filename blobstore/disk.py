"""The disk tier: content-addressed chunk files, written atomically, verified on every read.

Layout: `<root>/<digest[:2]>/<digest>` for a raw chunk, `<digest>.lz4` for a compressed one
(an LZ4 block with its raw size in front). A raw file holds exactly the chunk's bytes, so a
restore reads it straight into its destination. Files only ever appear under their final
name by `rename` of a fsynced temp file, so a reader never sees a torn chunk; a writer that
dies leaves a `.tmp.<pid>.<token>` file behind, which `gc` removes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import threading
import time
from collections.abc import Container, Iterator
from pathlib import Path
from typing import NamedTuple

import lz4.block

from thaw.core.errors import ChunkNotFound, CorruptChunk, ThawError

from .chunks import BytesLike, Compression, as_byte_view, check_digest, digest_of, verify
from .copying import copy_bytes

# Keep a chunk LZ4-compressed only when that saves at least a quarter of its bytes.
# Measured here (Xeon, 4 MiB chunks, one core): LZ4 decompresses ~8-10 GB/s and SHA-256,
# which every read pays anyway, runs ~1.7 GB/s. Assumed: a local NVMe reads ~3 GB/s cold.
# A compressed chunk then reads faster only if saving/3 > 1/8, i.e. a saving over ~0.35
# cold, and never from a warm page cache; under ~25% the disk space saved is not worth
# decompressing on every restore. Float weights save ~0% (random mantissas) and stay raw;
# zero pages, padding and integer tables save 90%+ and are compressed.
LZ4_MIN_SAVING = 0.25

# A temp file this old is stale even if a process with its writer's pid is alive (pids
# get reused); a chunk write takes milliseconds, so an hour is far beyond any real one.
STALE_TEMP_SECONDS = 3600.0

_TEMP_PREFIX = ".tmp."
_LZ4_SUFFIX = ".lz4"

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


class GcResult(NamedTuple):
    """What `DiskTier.gc` deleted: unreferenced chunks plus stale temp files."""

    removed: int
    freed_bytes: int


class DiskTier:
    """Chunk files under `root`, keyed by the SHA-256 of their raw bytes.

    Thread-safe and safe across processes sharing `root` (every change is a rename or an
    unlink). `gc` must not race with a `put` whose manifest is not yet in `referenced`:
    the caller serialises the two.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- writing ---------------------------------------------------------------------

    def put(self, data: BytesLike) -> StoredChunk:
        """Store `data` once under its digest; storing the same bytes again writes nothing.

        An existing copy is verified first and rewritten if it is corrupt, so putting the
        right bytes heals a damaged chunk.
        """
        raw = as_byte_view(data)
        digest = digest_of(raw)
        found = self._locate(digest)
        if found is not None:
            path, compression = found
            try:
                self._read_verified(digest, path, compression)
                return StoredChunk(digest, path.stat().st_size, compression)
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
        """Remove a chunk; returns the bytes freed (0 if it was absent)."""
        freed = 0
        for compression in ("none", "lz4"):
            path = self._path(check_digest(digest), compression)
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except FileNotFoundError:
                continue
        return freed

    def gc(self, referenced: Container[str]) -> GcResult:
        """Delete every chunk not in `referenced`, and temp files no live writer owns."""
        removed = freed = 0
        now = time.time()
        for shard in self._shards():
            for entry in _scandir(shard):
                name = entry.name
                try:
                    size = entry.stat().st_size
                    if name.startswith(_TEMP_PREFIX):
                        if not self._temp_is_stale(entry, now):
                            continue
                    elif _digest_from_name(name) in referenced:
                        continue
                    elif _digest_from_name(name) is None:
                        continue  # not ours: leave it alone
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
        return self._read_verified(digest, *found)

    def read_into(self, digest: str, out: memoryview) -> None:
        """Fill `out` (exactly the chunk's raw length) with the chunk's verified bytes.

        A raw chunk is read straight into `out` and hashed there, saving a copy; on
        CorruptChunk or ChunkNotFound `out` holds garbage and the caller must not use it.
        """
        found = self._locate(check_digest(digest))
        if found is None:
            raise ChunkNotFound(f"chunk {digest} is not on disk")
        path, compression = found
        if compression == "lz4":
            raw = self._read_verified(digest, path, compression)
            if len(raw) != len(out):
                raise CorruptChunk(f"chunk {digest} is {len(raw)} bytes, expected {len(out)}")
            copy_bytes(out, raw)
            return
        try:
            with open(path, "rb", buffering=0) as file:
                size = os.fstat(file.fileno()).st_size
                if size != len(out):
                    raise CorruptChunk(f"chunk {digest} is {size} bytes on disk, "
                                       f"expected {len(out)}")
                _read_exactly(file, out, digest)
        except FileNotFoundError as exc:
            raise ChunkNotFound(f"chunk {digest} is not on disk") from exc
        except OSError as exc:
            raise ThawError(f"reading chunk {digest}: {exc}") from exc
        verify(digest, out)

    def stat(self, digest: str) -> StoredChunk:
        """How a chunk is stored, without reading it."""
        found = self._locate(check_digest(digest))
        if found is None:
            raise ChunkNotFound(f"chunk {digest} is not on disk")
        path, compression = found
        try:
            return StoredChunk(digest, path.stat().st_size, compression)
        except FileNotFoundError as exc:
            raise ChunkNotFound(f"chunk {digest} is not on disk") from exc

    def digests(self) -> Iterator[str]:
        """Every stored chunk's digest (temp files are not chunks)."""
        for shard in self._shards():
            for entry in _scandir(shard):
                digest = _digest_from_name(entry.name)
                if digest is not None:
                    yield digest

    def stored_bytes(self) -> int:
        """Bytes the chunks take on disk (after compression; temp files excluded)."""
        total = 0
        for shard in self._shards():
            for entry in _scandir(shard):
                if _digest_from_name(entry.name) is not None:
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        return total

    # -- internals -------------------------------------------------------------------

    def _path(self, digest: str, compression: Compression) -> Path:
        name = digest + (_LZ4_SUFFIX if compression == "lz4" else "")
        return self.root / digest[:2] / name

    def _locate(self, digest: str) -> tuple[Path, Compression] | None:
        for compression in ("none", "lz4"):
            path = self._path(digest, compression)
            if path.exists():
                return path, compression
        return None

    def _read_verified(self, digest: str, path: Path, compression: Compression) -> bytes:
        try:
            stored = path.read_bytes()
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
        verify(digest, raw)
        return raw

    def _write_atomic(self, final: Path, payload: BytesLike) -> None:
        shard = final.parent
        try:
            shard.mkdir()
            _fsync_dir(self.root)  # the new shard's own entry must survive a crash too
        except FileExistsError:
            pass
        temp = shard / f"{_TEMP_PREFIX}{os.getpid()}.{secrets.token_hex(6)}"
        with _WRITING_LOCK:
            _WRITING.add(str(temp))
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, as_byte_view(payload))
                os.fsync(fd)
            finally:
                os.close(fd)
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

    def _shards(self) -> Iterator[Path]:
        for entry in _scandir(self.root):
            if len(entry.name) == 2 and entry.is_dir(follow_symlinks=False):
                yield Path(entry.path)


def _encode(raw: memoryview) -> tuple[BytesLike, Compression]:
    # lz4 releases the GIL, so store_arena compresses chunks on all cores.
    compressed = lz4.block.compress(raw, store_size=True)
    if len(compressed) <= len(raw) * (1.0 - LZ4_MIN_SAVING):
        return compressed, "lz4"
    return raw, "none"


def _digest_from_name(name: str) -> str | None:
    digest = name.removesuffix(_LZ4_SUFFIX)
    if len(digest) != 64 or name.startswith("."):
        return None
    try:
        return check_digest(digest)
    except ThawError:
        return None


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


def _read_exactly(file: io.FileIO, out: memoryview, digest: str) -> None:
    filled = 0
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
