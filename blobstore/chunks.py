"""A chunk reference: where a content-addressed piece of an arena goes, and how it is stored.

The fields mirror `thaw.v1.Chunk` in proto/manifest.proto field for field; the lead converts
between the two through `ChunkRef.to_dict` / `ChunkRef.from_dict` so this package never
imports protobuf.
"""

from __future__ import annotations

import hashlib
import mmap
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeAlias, cast, get_args

from thaw.core.errors import CorruptChunk, InvalidArgument

# 4 MiB: big enough that what each chunk costs beyond its bytes (a file, an fsync, a
# dict entry, ~5 us of Python per copy) is under 1% of copying it (~400 us at ~10 GB/s
# per thread), small enough that dedupe stays fine-grained, that `workers` chunks in
# flight bound a restore's extra memory to tens of MiB, and that a ~90 MB model arena
# still spreads over every core. bench/restore.py measures the copy side of this.
# Must stay a multiple of the page size: the snapshotter aligns storages to 4096 bytes
# (ARENA_ALIGNMENT) and the pinned tier only lays page-multiple chunks back to back.
CHUNK_SIZE = 4 * 1024 * 1024

Compression: TypeAlias = Literal["none", "lz4"]
COMPRESSIONS: tuple[Compression, ...] = get_args(Compression)

# What arenas, slices and chunks arrive as. A NumPy array goes in as `array.data`
# (its own buffer protocol is only visible to type checkers from Python 3.12).
BytesLike: TypeAlias = bytes | bytearray | memoryview | mmap.mmap

_DIGEST = re.compile(r"[0-9a-f]{64}")


def as_byte_view(data: BytesLike) -> memoryview:
    """A flat unsigned-byte view of `data` (no copy), whatever its item format."""
    view = memoryview(data)
    if view.format == "B" and view.ndim == 1:
        return view
    if not view.c_contiguous:
        raise InvalidArgument("buffer must be C-contiguous", field="buffer")
    return view.cast("B")


def digest_of(data: BytesLike) -> str:
    """Hex SHA-256 of the raw bytes: a chunk's name everywhere in thaw."""
    # hashlib releases the GIL for buffers over 2 KiB, so chunk hashing runs in parallel.
    return hashlib.sha256(as_byte_view(data)).hexdigest()


def check_digest(digest: str) -> str:
    """Return `digest` if it is a lowercase hex SHA-256; it becomes a file name, so this
    also keeps a hostile manifest from naming paths outside the store."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidArgument(f"not a hex SHA-256 digest: {digest!r}", field="digest")
    return digest


def verify(digest: str, data: BytesLike) -> None:
    """Raise CorruptChunk naming `digest` unless `data` hashes to it."""
    actual = digest_of(data)
    if actual != digest:
        raise CorruptChunk(f"chunk {digest} is corrupt: its bytes hash to {actual}")


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of an arena: the raw bytes [offset, offset + length) hash to `digest`."""

    digest: str
    """Hex SHA-256 of the raw (uncompressed) bytes."""
    offset: int
    """Where the raw bytes sit in the arena."""
    length: int
    """Raw length in bytes."""
    stored_length: int
    """Length on the disk tier (after compression, if any)."""
    compression: Compression = "none"
    """How the disk tier stores it: "none" or "lz4"."""

    def __post_init__(self) -> None:
        check_digest(self.digest)
        for name in ("offset", "length", "stored_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(f"{name} must be an integer >= 0, got {value!r}",
                                      field=name)
        if self.compression not in COMPRESSIONS:
            raise InvalidArgument(f"compression must be one of {COMPRESSIONS}, "
                                  f"got {self.compression!r}", field="compression")

    @property
    def end(self) -> int:
        return self.offset + self.length

    def to_dict(self) -> dict[str, str | int]:
        """Plain fields, named as in `thaw.v1.Chunk`."""
        return {
            "digest": self.digest,
            "offset": self.offset,
            "length": self.length,
            "stored_length": self.stored_length,
            "compression": self.compression,
        }

    @classmethod
    def from_dict(cls, fields: Mapping[str, object]) -> ChunkRef:
        """Inverse of `to_dict`; a missing or ill-typed field raises InvalidArgument naming it."""
        for name in ("digest", "offset", "length", "stored_length"):
            if name not in fields:
                raise InvalidArgument(f"chunk is missing {name!r}", field=name)
        compression = fields.get("compression", "none")
        if compression not in COMPRESSIONS:
            raise InvalidArgument(f"compression must be one of {COMPRESSIONS}, "
                                  f"got {compression!r}", field="compression")
        return cls(
            digest=cast(str, fields["digest"]),
            offset=cast(int, fields["offset"]),
            length=cast(int, fields["length"]),
            stored_length=cast(int, fields["stored_length"]),
            compression=compression,
        )
