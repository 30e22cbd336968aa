"""Moving a disk tier written before BLAKE3 onto BLAKE3 addresses, in place.

Each SHA-256 chunk's file is hard-linked under its BLAKE3 name and its old name becomes
an alias (a symlink) of it (`DiskTier.migrate`): no bytes are copied, no manifest
changes, and a snapshot naming SHA-256 digests keeps restoring, verified with BLAKE3
from then on. New snapshots of the same bytes find them under BLAKE3 and store nothing.
Safe to run while the node serves (every change is a link or a rename) and to run again
(migrated chunks are skipped); a chunk found corrupt is left as it was and reported, so
a restore repairs it from a peer as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from thaw.core.errors import ChunkNotFound, CorruptChunk

from .bounded import resolve_workers, run_bounded
from .chunks import algorithm_of
from .disk import DiskTier


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What one `migrate_disk_tier` did."""

    migrated: int
    """SHA-256 chunks given a BLAKE3 name by this run."""
    already: int
    """SHA-256 chunks that were aliases already."""
    blake3: int
    """Chunks written under BLAKE3 in the first place."""
    corrupt: list[str] = field(default_factory=list)
    """SHA-256 chunks whose bytes no longer match their digest (left untouched)."""

    def to_dict(self) -> dict[str, object]:
        return {"migrated": self.migrated, "already": self.already,
                "blake3": self.blake3, "corrupt": list(self.corrupt)}


def migrate_disk_tier(disk: DiskTier, workers: int | None = None) -> MigrationReport:
    """Give every SHA-256 chunk under `disk` its BLAKE3 name (reading and verifying each
    on `workers` threads: hashing and reads release the GIL)."""
    legacy: list[str] = []
    blake3 = 0
    for digest in dict.fromkeys(disk.digests()):
        if algorithm_of(digest) == "blake3":
            blake3 += 1
        else:
            legacy.append(digest)

    def migrate(digest: str) -> str:
        try:
            return "migrated" if disk.migrate(digest) else "already"
        except CorruptChunk:
            return "corrupt"
        except ChunkNotFound:
            return "gone"  # deleted meanwhile (gc, a repair): nothing to move

    outcomes = run_bounded(migrate, legacy, resolve_workers(workers))
    return MigrationReport(
        migrated=outcomes.count("migrated"),
        already=outcomes.count("already"),
        blake3=blake3,
        corrupt=sorted(d for d, o in zip(legacy, outcomes, strict=True) if o == "corrupt"),
    )


def migrate_root(root: Path | str, workers: int | None = None) -> MigrationReport:
    """`migrate_disk_tier` for the disk tier at `root` (a node's `<home>/agent/<node>/chunks`)."""
    path = Path(root)
    if not path.is_dir():
        raise ChunkNotFound(f"no disk tier at {path}")
    return migrate_disk_tier(DiskTier(path), workers)
