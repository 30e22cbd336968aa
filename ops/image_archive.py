"""`thaw deploy image.tar`: the bundle folder read out of a `docker save` archive,
and the archive's upload.

The archive is read as a stream (core/image_archive.py): its index and config in two
small passes, then one pass over its layers keeping only the entries under the bundle
folder (the path the label `org.thaw.bundle` names, `/app` by default, as for `thaw
deploy IMAGE`), bounded in bytes. Layers are applied bottom first with their
whiteouts (`.wh.<name>` removes a lower layer's entry, `.wh..wh..opq` empties a
folder), as an engine would, so the folder is the image's. Nothing of the archive is
written to disk but the bundle folder.

The archive itself goes to the gateway (`PUT /v1/images/<image id>`, streamed from
the file) before the bundle: nodes load it into their engines when they first need
the image (platform/image_load.py).
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from thaw.core.errors import ThawError
from thaw.core.image_archive import ArchiveImage, ImageArchiveError, iter_members

# Names an archive may end in; a file of another name is still read as one.
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
# The archive is streamed to the gateway in pieces of this size.
UPLOAD_PIECE_BYTES = 1024 * 1024


@dataclass
class _Entry:
    kind: str  # "file", "dir" or "link"
    data: bytes = b""
    mode: int = 0o644
    target: str = ""


@dataclass
class _Layer:
    entries: dict[str, _Entry] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)


def _relative(name: str, folder: str) -> str | None:
    """`name` (a layer's path) relative to `folder` (absolute, normalised); '' for the
    folder itself, None outside it."""
    path = "/" + posixpath.normpath(name).lstrip("/")
    if path == folder:
        return ""
    return path[len(folder) + 1:] if path.startswith(folder + "/") else None


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, nbytes: int, folder: str) -> None:
        self.used += nbytes
        if self.used > self.limit:
            raise ThawError(f"the image's bundle folder {folder} is larger than "
                            f"{self.limit} bytes: a bundle carries code; put weights and "
                            "packages in the image outside it")


def _read_layer(handle: IO[bytes], folder: str, budget: _Budget, what: str) -> _Layer:
    layer = _Layer()
    try:
        with tarfile.open(fileobj=handle, mode="r|*") as tar:
            for member in tar:
                rel = _relative(member.name, folder)
                if rel is None:
                    continue
                base = posixpath.basename(rel)
                parent = posixpath.dirname(rel)
                if base == OPAQUE:
                    layer.opaque.append(parent)
                elif base.startswith(WHITEOUT):
                    layer.removed.append(posixpath.join(parent, base[len(WHITEOUT):]))
                elif member.isdir():
                    layer.entries[rel] = _Entry("dir", mode=member.mode & 0o777)
                elif member.issym():
                    layer.entries[rel] = _Entry("link", target=member.linkname)
                elif member.islnk():
                    source = _relative(member.linkname, folder)
                    known = layer.entries.get(source) if source is not None else None
                    if known is None or known.kind != "file":
                        raise ThawError(f"{member.name} in {what} is a hard link to "
                                        f"{member.linkname}, outside the bundle folder")
                    layer.entries[rel] = known
                elif member.isfile():
                    budget.take(member.size, folder)
                    data = tar.extractfile(member)
                    layer.entries[rel] = _Entry(
                        "file", data.read() if data is not None else b"",
                        mode=member.mode & 0o777)
                # Devices and FIFOs have no place in a bundle: left out.
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageArchiveError(f"{what} is not a readable layer: {exc}",
                                field="archive") from exc
    return layer


def _apply(tree: dict[str, _Entry], layer: _Layer) -> None:
    def drop(prefix: str, keep_self: bool) -> None:
        for key in [k for k in tree if k == prefix or k.startswith(prefix + "/")
                    or prefix == ""]:
            if keep_self and key == prefix:
                continue
            del tree[key]

    for folder in layer.opaque:
        drop(folder, keep_self=True)
    for path in layer.removed:
        drop(path, keep_self=False)
    for path, entry in layer.entries.items():
        if entry.kind != "dir":  # a file or link replaces a folder and all in it
            drop(path, keep_self=False)
    tree.update(layer.entries)


def bundle_tree(path: Path, image: ArchiveImage, folder: str,
                limit: int) -> dict[str, _Entry]:
    """The entries under `folder` in the image's filesystem (the layers merged),
    reading the archive once; at most `limit` bytes of file content per layer."""
    order = {name: index for index, name in enumerate(image.layers)}
    layers: dict[int, _Layer] = {}
    budget = _Budget(limit)
    for tar, member in iter_members(path):
        name = posixpath.normpath(member.name).lstrip("/")
        if name not in order or not member.isfile():
            continue
        handle = tar.extractfile(member)
        if handle is not None:
            with handle:
                layers[order[name]] = _read_layer(handle, folder, budget, name)
    missing = [name for name, index in order.items() if index not in layers]
    if missing:
        raise ImageArchiveError(f"the manifest names layer {missing[0]}, which the "
                                "archive lacks", field="archive")
    tree: dict[str, _Entry] = {}
    for index in sorted(layers):
        _apply(tree, layers[index])
    return tree


def write_tree(tree: dict[str, _Entry], dest: Path) -> None:
    """The merged folder under `dest` (paths already relative and normalised)."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    for rel in sorted(tree):
        if not rel:
            continue
        entry = tree[rel]
        target = dest / rel
        if ".." in Path(rel).parts:
            raise ThawError(f"bundle entry {rel!r} leaves the bundle folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        # A link the folder holds must not lead a later entry outside it.
        if not target.parent.resolve().is_relative_to(root):
            raise ThawError(f"bundle entry {rel!r} is under a link that leaves the bundle "
                            "folder")
        if entry.kind == "dir":
            target.mkdir(exist_ok=True)
        elif entry.kind == "link":
            os.symlink(entry.target, target)
        else:
            target.write_bytes(entry.data)
            target.chmod(entry.mode | 0o600)


def looks_like_archive(path: Path) -> bool:
    """A file given to `thaw deploy`: read as an image archive (a folder never is)."""
    return path.is_file()


def archive_pieces(path: Path) -> Iterator[bytes]:
    """The archive file in UPLOAD_PIECE_BYTES pieces (the upload's body)."""
    with open(path, "rb") as handle:
        while piece := handle.read(UPLOAD_PIECE_BYTES):
            yield piece


__all__ = [
    "ARCHIVE_SUFFIXES",
    "archive_pieces",
    "bundle_tree",
    "looks_like_archive",
    "write_tree",
]
