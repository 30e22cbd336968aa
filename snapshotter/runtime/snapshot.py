"""The on-disk layout of a snapshot as the runtime writes and reads it (DESIGN.md §4).

A build's output folder holds four files: the pickled handler (`state.pickle`), the host
and device arenas, and `snapshot.json` describing them. The agent turns this into the
protobuf manifest and blobstore chunks; the runtime only ever sees these files.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1

# Every storage starts on a page boundary, so a copy-on-write mapping of the arena gives
# each storage its own pages (a write into one tensor never unshares its neighbour) and
# the agent can map arena chunks straight from the pinned tier. The blobstore's chunk
# size must stay a multiple of this.
ARENA_ALIGNMENT = 4096

# Persistent-id tags in state.pickle: ("storage", index, dtype) for a torch storage,
# ("bytes" | "bytearray", <out-of-band buffer>) for large bytes objects.
STORAGE_TAG = "storage"
BYTES_TAG = "bytes"
BYTEARRAY_TAG = "bytearray"

PICKLE_FILE = "state.pickle"
HOST_ARENA_FILE = "host.arena"
DEVICE_ARENA_FILE = "device.arena"
SNAPSHOT_FILE = "snapshot.json"


class Arena(str, enum.Enum):
    HOST = "host"
    DEVICE = "device"


class StorageKind(str, enum.Enum):
    # A torch storage, referenced from the pickle by persistent id.
    TORCH = "torch"
    # A protocol-5 out-of-band buffer (NumPy array data, large bytes/bytearray),
    # handed to pickle.loads(buffers=...) in table order.
    BUFFER = "buffer"


def align_up(offset: int) -> int:
    return -(-offset // ARENA_ALIGNMENT) * ARENA_ALIGNMENT


@dataclasses.dataclass(frozen=True)
class StorageEntry:
    """One storage or buffer laid out in an arena."""

    index: int
    arena: Arena
    offset: int
    nbytes: int
    kind: StorageKind
    # torch dtype name without the "torch." prefix ("float32"); "uint8" for buffers.
    dtype: str
    # Where the storage lived at capture: "cpu", "cuda:0", ...
    device: str

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["arena"] = self.arena.value
        record["kind"] = self.kind.value
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> StorageEntry:
        return cls(
            index=int(record["index"]),
            arena=Arena(record["arena"]),
            offset=int(record["offset"]),
            nbytes=int(record["nbytes"]),
            kind=StorageKind(record["kind"]),
            # The agent's manifest round trip may turn these into null.
            dtype=str(record.get("dtype") or "uint8"),
            device=str(record.get("device") or "cpu"),
        )


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a restore must match. Versions are those of modules the function imported
    (None if it did not import them)."""

    python: str
    torch: str | None
    numpy: str | None
    device_type: str  # "host" or "cuda"
    gpu_model: str | None
    driver: str | None
    function_version: str | None
    compute_capability: str | None = None
    """The GPU's compute capability ("9.0") where the snapshot holds device memory."""


@dataclasses.dataclass(frozen=True)
class SnapshotMeta:
    """The contents of snapshot.json."""

    storages: tuple[StorageEntry, ...]
    # Modules imported by the handler's import and setup(), in import order: a template
    # pre-imports them so a restore skips the imports.
    modules: tuple[str, ...]
    fingerprint: Fingerprint
    timings: dict[str, float]
    host_size: int
    device_size: int
    format: int = FORMAT_VERSION
    input_schema: str = ""
    """predict()'s input schema as JSON (signature.py); "": none."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "storages": [entry.to_json() for entry in self.storages],
            "modules": list(self.modules),
            "fingerprint": dataclasses.asdict(self.fingerprint),
            "timings": self.timings,
            "host_size": self.host_size,
            "device_size": self.device_size,
            "input_schema": self.input_schema,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> SnapshotMeta:
        if record.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"snapshot format {record.get('format')!r} is not {FORMAT_VERSION}"
            )
        return cls(
            storages=tuple(StorageEntry.from_json(item) for item in record["storages"]),
            modules=tuple(record["modules"]),
            fingerprint=Fingerprint(**record["fingerprint"]),
            timings=dict(record.get("timings", {})),
            host_size=int(record["host_size"]),
            device_size=int(record["device_size"]),
            input_schema=str(record.get("input_schema") or ""),
        )

    @classmethod
    def load(cls, source: int | str | os.PathLike[str]) -> SnapshotMeta:
        """From a descriptor (what an instance gets; left open) or a path."""
        if isinstance(source, int):
            return cls.from_json(json.loads(read_descriptor(source)))
        with open(source, encoding="utf-8") as f:
            return cls.from_json(json.load(f))

    def dump(self, path: Path) -> None:
        # Written last and renamed into place: a snapshot.json means a complete build.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def read_descriptor(fd: int) -> bytes:
    """A whole file by descriptor, from offset 0 with pread: a descriptor received from
    the agent shares its file offset with every other process holding it, so read()
    would race them."""
    size = os.fstat(fd).st_size
    parts: list[bytes] = []
    done = 0
    while done < size:
        part = os.pread(fd, size - done, done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)
