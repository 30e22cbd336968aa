"""A `docker save` archive read as a stream: which image it holds and its config.

Two layouts are read, plain or gzip-compressed:
- docker's own (`manifest.json`: one entry with `Config`, `RepoTags`, `Layers`; the
  config at `<hex>.json` before docker 25, at `blobs/sha256/<hex>` after);
- OCI (`index.json` naming a manifest blob, or an index of them, under
  `blobs/sha256/`), which docker 25 and later write beside manifest.json.

Nothing is extracted: each pass decompresses the archive once and keeps only the
members asked for, each under a size bound, so a multi-GiB archive costs a few
small reads of memory. The image id is the config's digest: `read_image` hashes the
config it finds and refuses an archive whose config does not hash to the digest its
manifest names (a tampered or damaged archive), so the id it returns is the one
`docker load` will give the image.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from thaw.core.errors import InvalidArgument

# manifest.json, index.json and OCI manifests list a few entries each: past this an
# archive is not one image.
MAX_INDEX_BYTES = 1024 * 1024
# An image config holds its history and labels; docker's own stay far below this.
MAX_CONFIG_BYTES = 8 * 1024 * 1024
# OCI indexes may nest (an index of platform manifests): this deep at most.
MAX_INDEX_DEPTH = 4
OCI_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                   "application/vnd.docker.distribution.manifest.list.v2+json")
DIGEST = re.compile(r"^sha256:([0-9a-f]{64})\Z")
HEX = re.compile(r"^[0-9a-f]{64}\Z")
FIELD = "archive"


class ImageArchiveError(InvalidArgument):
    """A file that is not a readable one-image `docker save` archive, or whose config
    does not match the digest its manifest names."""


@dataclass(frozen=True)
class ArchiveImage:
    """The one image of an archive, its config checked against its digest."""

    image_id: str
    """`sha256:<hex>`: the config's digest, the id `docker load` gives the image."""
    config: Mapping[str, Any]
    layers: tuple[str, ...]
    """Archive member names of the layer tarballs, bottom first."""
    repo_tags: tuple[str, ...]

    @property
    def labels(self) -> Mapping[str, str]:
        labels = (self.config.get("config") or {}).get("Labels") or {}
        return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


@dataclass(frozen=True)
class _Pointer:
    """What the index says before the config is read."""

    config: str
    digest: str
    layers: tuple[str, ...]
    repo_tags: tuple[str, ...]


def image_hex(image_id: str) -> str:
    """The hex of an image id `sha256:<64 hex>`; InvalidArgument naming `image_id` else."""
    match = DIGEST.match(image_id)
    if match is None:
        raise InvalidArgument(f"an image id is sha256:<64 lowercase hex>, got {image_id!r}",
                              field="image_id")
    return match.group(1)


def open_stream(path: Path) -> tarfile.TarFile:
    """The archive as a forward-only tar stream (plain or gzip'd: `r|*`)."""
    try:
        return tarfile.open(path, mode="r|*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageArchiveError(f"{path.name} is not a docker save archive (a tar, "
                                f"optionally gzip'd): {exc}", field=FIELD) from exc


def iter_members(path: Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Every member of the archive in order, its tar errors translated."""
    with open_stream(path) as tar:
        try:
            for member in tar:
                yield tar, member
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise ImageArchiveError(f"{path.name} is damaged or not a tar archive: {exc}",
                                    field=FIELD) from exc


def member_name(name: str) -> str:
    """A member name as manifests write it (no leading ./)."""
    return posixpath.normpath(name).lstrip("/")


def read_members(path: Path, wanted: Mapping[str, int]) -> dict[str, bytes]:
    """The bytes of the members named in `wanted` (name -> the most bytes it may
    have), in one pass; a member past its bound is refused naming it."""
    found: dict[str, bytes] = {}
    for tar, member in iter_members(path):
        name = member_name(member.name)
        if name not in wanted or not member.isfile():
            continue
        if member.size > wanted[name]:
            raise ImageArchiveError(f"{name} in {path.name} is {member.size} bytes, more "
                                    f"than the {wanted[name]} a docker save archive's "
                                    "metadata may have", field=FIELD)
        handle = tar.extractfile(member)
        if handle is not None:
            found[name] = _read_all(handle)
    return found


def _read_all(handle: IO[bytes]) -> bytes:
    with handle:
        return handle.read()


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageArchiveError(f"{what} is not JSON: {exc}", field=FIELD) from exc


def blob_path(digest: str) -> str:
    """The member an OCI layout keeps `digest`'s blob in."""
    match = DIGEST.match(digest) if isinstance(digest, str) else None
    if match is None:
        raise ImageArchiveError(f"not a sha256 digest: {digest!r}", field=FIELD)
    return f"blobs/sha256/{match.group(1)}"


def config_digest(config_path: str) -> str:
    """The digest a docker manifest's `Config` names by its file name:
    `blobs/sha256/<hex>` (docker 25+) or `<hex>.json` (older)."""
    base = posixpath.basename(config_path).removesuffix(".json")
    if not HEX.match(base):
        raise ImageArchiveError(f"manifest.json's Config {config_path!r} names no sha256 "
                                "digest (blobs/sha256/<hex> or <hex>.json)", field=FIELD)
    return f"sha256:{base}"


def _from_docker_manifest(data: bytes) -> _Pointer:
    entries = _json(data, "manifest.json")
    if not isinstance(entries, list) or not entries:
        raise ImageArchiveError("manifest.json lists no image", field=FIELD)
    if len(entries) != 1:
        raise ImageArchiveError(f"the archive holds {len(entries)} images: save one "
                                "(`docker save IMAGE -o image.tar`)", field=FIELD)
    entry = entries[0]
    config = entry.get("Config") if isinstance(entry, dict) else None
    layers = entry.get("Layers") if isinstance(entry, dict) else None
    if not isinstance(config, str) or not isinstance(layers, list) or not all(
            isinstance(layer, str) for layer in layers):
        raise ImageArchiveError("manifest.json's entry needs Config (a path) and Layers "
                                "(paths)", field=FIELD)
    tags = entry.get("RepoTags") or []
    return _Pointer(member_name(config), config_digest(config),
                    tuple(member_name(layer) for layer in layers),
                    tuple(t for t in tags if isinstance(t, str)))


def _descriptor(doc: Any, what: str) -> Mapping[str, Any]:
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ImageArchiveError(f"{what} lists no manifest", field=FIELD)
    if len(manifests) != 1:
        raise ImageArchiveError(f"{what} lists {len(manifests)} images: save one",
                                field=FIELD)
    entry = manifests[0]
    if not isinstance(entry, dict):
        raise ImageArchiveError(f"{what}'s manifest entry is not an object", field=FIELD)
    return entry


def _ref_name(entry: Mapping[str, Any]) -> tuple[str, ...]:
    notes = entry.get("annotations") or {}
    name = notes.get("io.containerd.image.name") if isinstance(notes, dict) else None
    return (name,) if isinstance(name, str) and name else ()


def _from_oci_index(path: Path, index: bytes) -> _Pointer:
    """Follow index.json (through nested indexes) to one image manifest."""
    entry = _descriptor(_json(index, "index.json"), "index.json")
    tags = _ref_name(entry)
    for _ in range(MAX_INDEX_DEPTH):
        name = blob_path(entry.get("digest", ""))
        data = read_members(path, {name: MAX_INDEX_BYTES}).get(name)
        if data is None:
            raise ImageArchiveError(f"index.json names {name}, which the archive lacks",
                                    field=FIELD)
        _check_digest(data, entry["digest"], name)
        doc = _json(data, name)
        if not isinstance(doc, dict):
            raise ImageArchiveError(f"{name} is not a manifest (a JSON object)", field=FIELD)
        if entry.get("mediaType") in OCI_INDEX_TYPES or doc.get("manifests") is not None:
            entry = _descriptor(doc, name)
            tags = tags or _ref_name(entry)
            continue
        config = doc.get("config") or {}
        layers = doc.get("layers") or []
        if not isinstance(config, dict) or not isinstance(layers, list):
            raise ImageArchiveError(f"{name} is not an image manifest", field=FIELD)
        digest = str(config.get("digest", ""))
        return _Pointer(blob_path(digest), digest,
                        tuple(blob_path(str(layer.get("digest", ""))) for layer in layers
                              if isinstance(layer, dict)), tags)
    raise ImageArchiveError(f"index.json nests indexes deeper than {MAX_INDEX_DEPTH}",
                            field=FIELD)


def _check_digest(data: bytes, digest: str, name: str) -> None:
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise ImageArchiveError(
            f"the archive is tampered with or damaged: {name} hashes to {actual}, not the "
            f"{digest} its manifest names", field=FIELD)


def read_image(path: Path) -> ArchiveImage:
    """The archive's one image: its id (the config's digest, checked), config, layer
    members and tags. Raises ImageArchiveError saying what is wrong."""
    found = read_members(path, {"manifest.json": MAX_INDEX_BYTES,
                                "index.json": MAX_INDEX_BYTES})
    if "manifest.json" in found:
        pointer = _from_docker_manifest(found["manifest.json"])
    elif "index.json" in found:
        pointer = _from_oci_index(path, found["index.json"])
    else:
        raise ImageArchiveError(f"{path.name} has neither manifest.json nor index.json: "
                                "not a docker save archive", field=FIELD)
    data = read_members(path, {pointer.config: MAX_CONFIG_BYTES}).get(pointer.config)
    if data is None:
        raise ImageArchiveError(f"the manifest names the config {pointer.config}, which "
                                "the archive lacks", field=FIELD)
    _check_digest(data, pointer.digest, pointer.config)
    config = _json(data, pointer.config)
    if not isinstance(config, dict) or not isinstance(config.get("rootfs"), dict):
        raise ImageArchiveError(f"{pointer.config} is not an image config (no rootfs)",
                                field=FIELD)
    return ArchiveImage(pointer.digest, config, pointer.layers, pointer.repo_tags)


__all__ = [
    "ArchiveImage",
    "ImageArchiveError",
    "MAX_CONFIG_BYTES",
    "MAX_INDEX_BYTES",
    "blob_path",
    "config_digest",
    "image_hex",
    "iter_members",
    "read_image",
    "read_members",
]
