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

import blake3

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

Algorithm: TypeAlias = Literal["blake3", "sha256"]

# A digest carries its algorithm, so snapshots written before BLAKE3 keep restoring and
# verifying: "b3:<hex>" is BLAKE3-256 (every chunk written now), a bare "<hex>" is the
# SHA-256 every chunk was named by before (read and verified, never written).
BLAKE3_PREFIX = "b3:"
_DIGEST = re.compile(r"(?:b3:)?[0-9a-f]{64}")


def as_byte_view(data: BytesLike) -> memoryview:
    """A flat unsigned-byte view of `data` (no copy), whatever its item format."""
    view = memoryview(data)
    if view.format == "B" and view.ndim == 1:
        return view
    if not view.c_contiguous:
        raise InvalidArgument("buffer must be C-contiguous", field="buffer")
    return view.cast("B")


def digest_of(data: BytesLike) -> str:
    """"b3:" + hex BLAKE3-256 of the raw bytes: a new chunk's name everywhere in thaw."""
    # One thread per chunk: callers hash many chunks at once on a pool, and blake3
    # releases the GIL, so the pool already spreads the hashing over every core.
    return BLAKE3_PREFIX + blake3.blake3(as_byte_view(data)).hexdigest()


def sha256_digest_of(data: BytesLike) -> str:
    """Hex SHA-256 of the raw bytes: how chunks were named before BLAKE3."""
    # hashlib releases the GIL for buffers over 2 KiB.
    return hashlib.sha256(as_byte_view(data)).hexdigest()


def algorithm_of(digest: str) -> Algorithm:
    """Which hash a (checked) digest was made with."""
    return "blake3" if digest.startswith(BLAKE3_PREFIX) else "sha256"


def hex_of(digest: str) -> str:
    """The digest's 64 hex characters, without its algorithm prefix."""
    return digest.removeprefix(BLAKE3_PREFIX)


def digest_with(algorithm: Algorithm, data: BytesLike) -> str:
    """`data`'s digest in the form `algorithm` names chunks."""
    return digest_of(data) if algorithm == "blake3" else sha256_digest_of(data)


def check_digest(digest: str) -> str:
    """Return `digest` if it is "b3:" + lowercase hex BLAKE3 or a bare lowercase hex
    SHA-256; it becomes a file name, so this also keeps a hostile manifest from naming
    paths outside the store."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidArgument(f"not a chunk digest (b3:<hex> or sha256 hex): {digest!r}",
                              field="digest")
    return digest


def matches(digest: str, data: BytesLike) -> bool:
    """Whether `data` hashes to `digest`, with the algorithm `digest` names."""
    return digest_with(algorithm_of(check_digest(digest)), data) == digest


def verify(digest: str, data: BytesLike) -> None:
    """Raise CorruptChunk naming `digest` unless `data` hashes to it (with the digest's
    own algorithm)."""
    actual = digest_with(algorithm_of(check_digest(digest)), data)
    if actual != digest:
        raise CorruptChunk(f"chunk {digest} is corrupt: its bytes hash to {actual}")


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of an arena: the raw bytes [offset, offset + length) hash to `digest`."""

    digest: str
    """The raw (uncompressed) bytes' digest: "b3:<hex>" (BLAKE3), or a bare hex SHA-256
    for chunks stored before BLAKE3."""
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
