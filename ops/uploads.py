"""Content-addressed chunked uploads, shared by volumes and large bundles.

Files are cut into CHUNK_BYTES chunks named by their sha256; the gateway is asked
which of them the tenant lacks (`POST /v1/blobs/missing`, MISSING_BATCH at a time) and
only those are sent (`PUT /v1/blobs/{sha256}`), so a re-run after an interruption, or
a second upload of the same bytes, sends only what is still missing. The caller then
commits what the chunks make: a volume's files, or a bundle to deploy.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from thaw.core.errors import BundleTooLarge, InvalidArgument, ThawError
from thaw.ops.client import DEPLOY_TIMEOUT, Client
from thaw.ops.progress import transfer_progress

# At most the gateway's and scheduler's MAX_CHUNK_BYTES (8 MiB): one chunk is one
# request and one gRPC message.
CHUNK_BYTES = 8 * 1024 * 1024
# Digests per "missing" question: at most the scheduler's MAX_DIGESTS_PER_CALL.
MISSING_BATCH = 1024
# A commit's JSON stays well under the gateway's max_json_bytes default (1 MiB):
# more files go in several commits, each adding to the last.
COMMIT_BATCH_BYTES = 512 * 1024
CHUNK_TIMEOUT = 300.0


@dataclass(frozen=True)
class Piece:
    """Where one chunk's bytes are: a file and a range of it, or bytes in memory."""

    digest: str
    source: Path | None
    offset: int
    length: int
    data: bytes = b""

    def read(self) -> bytes:
        if self.source is None:
            return self.data
        with open(self.source, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.length)
        if hashlib.sha256(data).hexdigest() != self.digest:
            raise ThawError(f"{self.source} changed while it was being uploaded: run the "
                            "upload again")
        return data


@dataclass(frozen=True)
class LocalFile:
    """A file to upload: its path in the volume and its chunks."""

    path: str
    source: Path
    size: int
    mode: int
    pieces: tuple[Piece, ...]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mode": self.mode,
                "chunks": [p.digest for p in self.pieces]}


@dataclass
class UploadReport:
    """What an upload sent: the counts the CLI prints and tests assert on."""

    chunks_total: int = 0
    chunks_sent: int = 0
    bytes_total: int = 0
    bytes_sent: int = 0
    files: int = 0
    result: dict[str, Any] = field(default_factory=dict)


def file_pieces(source: Path, chunk_bytes: int = CHUNK_BYTES) -> tuple[Piece, ...]:
    """The chunks of a file, hashed as it is read (one chunk in memory at a time)."""
    pieces = []
    offset = 0
    with open(source, "rb") as handle:
        while data := handle.read(chunk_bytes):
            pieces.append(Piece(hashlib.sha256(data).hexdigest(), source, offset, len(data)))
            offset += len(data)
    return tuple(pieces)


def bytes_pieces(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> tuple[Piece, ...]:
    return tuple(Piece(hashlib.sha256(data[i:i + chunk_bytes]).hexdigest(), None, i,
                       len(data[i:i + chunk_bytes]), data[i:i + chunk_bytes])
                 for i in range(0, len(data), chunk_bytes))


def volume_path(relative: str, prefix: str = "") -> str:
    """The file's path in the volume: '/'-separated, under `prefix`, never leaving it."""
    joined = PurePosixPath(prefix.strip("/")) / relative if prefix.strip("/") else \
        PurePosixPath(relative)
    parts = joined.parts
    if not parts or any(p in ("", ".", "..") for p in parts) or joined.is_absolute():
        raise InvalidArgument(f"unsafe path in the volume: {str(joined)!r}", field="path")
    return "/".join(parts)


def scan(path: Path, prefix: str = "", chunk_bytes: int = CHUNK_BYTES) -> list[LocalFile]:
    """The files under `path` (a file, or a folder walked in order; symlinks to files
    are read, other special files refused) with their chunks."""
    if not path.exists():
        raise InvalidArgument(f"{path} does not exist", field="path")
    if path.is_file():
        found = [(path, path.name)]
    else:
        found = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                full = Path(root, name)
                found.append((full, full.relative_to(path).as_posix()))
    files = []
    for source, relative in found:
        info = source.stat()
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"{source} is not a regular file", field="path")
        files.append(LocalFile(volume_path(relative, prefix), source, info.st_size,
                               stat.S_IMODE(info.st_mode), file_pieces(source, chunk_bytes)))
    return files


def upload_pieces(client: Client, pieces: Iterable[Piece], description: str,
                  on_sent: Callable[[Piece], None] | None = None) -> UploadReport:
    """Send the chunks the tenant lacks, with a progress bar over the bytes sent."""
    unique = list({p.digest: p for p in pieces}.values())
    report = UploadReport(chunks_total=len(unique), bytes_total=sum(p.length for p in unique))
    missing: list[Piece] = []
    for start in range(0, len(unique), MISSING_BATCH):
        batch = unique[start:start + MISSING_BATCH]
        answer = client.request("POST", "/v1/blobs/missing",
                                json={"digests": [p.digest for p in batch]}).json()
        lacking = set(answer["missing"])
        missing += [p for p in batch if p.digest in lacking]
    with transfer_progress() as progress:
        task = progress.add_task(description, total=sum(p.length for p in missing) or None)
        for piece in missing:
            client.request("PUT", f"/v1/blobs/{piece.digest}", content=piece.read(),
                           headers={"Content-Type": "application/octet-stream"},
                           timeout=CHUNK_TIMEOUT)
            report.chunks_sent += 1
            report.bytes_sent += piece.length
            progress.advance(task, piece.length)
            if on_sent is not None:
                on_sent(piece)
    return report


def _commit_batches(files: Sequence[LocalFile]) -> Iterable[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    size = 0
    for f in files:
        entry = f.to_json()
        cost = len(f.path) + 70 * len(f.pieces) + 64
        if batch and size + cost > COMMIT_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += cost
    if batch or not files:
        yield batch


def put_volume(client: Client, name: str, path: Path, prefix: str = "",
               chunk_bytes: int = CHUNK_BYTES) -> UploadReport:
    """Upload `path` (a file or folder) into volume `name` under `prefix`: only the
    chunks the tenant lacks, then a commit adding or replacing those files."""
    client.request("GET", f"/v1/volumes/{name}")  # 404 before reading anything
    files = scan(path, prefix, chunk_bytes)
    report = upload_pieces(client, (p for f in files for p in f.pieces),
                           f"volume {name}")
    report.files = len(files)
    for batch in _commit_batches(files):
        report.result = client.request("POST", f"/v1/volumes/{name}/commit",
                                       json={"files": batch}).json()
    return report


def deploy_chunked(client: Client, bundle: bytes, wait: bool = True,
                   force: bool = False,
                   on_uploaded: Callable[[], None] | None = None) -> UploadReport:
    """Deploy a packed bundle past the single-request cap: its chunks the tenant lacks
    are sent, then the scheduler reassembles and deploys it (within the tenant's
    max_bundle_bytes). `report.result` is the function's JSON, as a plain deploy's;
    `on_uploaded` is called once every chunk is there, before the deploy waits."""
    pieces = bytes_pieces(bundle)
    report = upload_pieces(client, pieces, "bundle")
    if on_uploaded is not None:
        on_uploaded()
    report.result = client.request(
        "POST", "/v1/functions/chunked",
        params={"wait": str(wait).lower(), "force": str(force).lower()},
        json={"chunks": [p.digest for p in pieces],
              "sha256": hashlib.sha256(bundle).hexdigest(), "size": len(bundle)},
        timeout=DEPLOY_TIMEOUT).json()
    return report


def pack_large(client: Client, folder: Path) -> bytes:
    """`folder` packed (and checked) under the tenant's max_bundle_bytes rather than
    the single-request cap: for a folder whose bundle is past that cap."""
    from thaw.core.bundle import limits_for
    from thaw.core.spec import pack_bundle, read_bundle

    if not (folder / "thaw.toml").exists():
        raise ThawError(f"{folder} has no thaw.toml (a bundle folder needs one)")
    quota = int(client.request("GET", "/v1/storage").json()["max_bundle_bytes"])
    limits = limits_for(quota)
    try:
        data = pack_bundle(str(folder), limits)
    except BundleTooLarge as exc:
        raise BundleTooLarge(
            f"{exc.message}; that is the tenant's max_bundle_bytes (an operator raises "
            f"it: thaw volume quota TENANT --max-bundle SIZE)",
            field="max_bundle_bytes") from exc
    read_bundle(data, limits)  # refused here, with the key at fault, before uploading
    return data
