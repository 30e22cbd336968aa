"""Bundles: a function's folder as a tarball (gzip, bzip2, xz or plain), read and
unpacked as a stream with every limit checked while the bytes arrive.

The same checks run wherever a bundle is opened (the CLI before an upload, the
scheduler at deploy, the agent when it unpacks), so a tarball that is refused is
refused before anything large is held in memory or written to disk:

- sizes: packed bytes, unpacked bytes (each member's declared size is checked before
  its data is read, and the decompressed stream itself is cut off past the limit),
  the number of members, the compression ratio (a gzip bomb stops within its first
  megabytes), the size of thaw.toml and of tar's own extended headers;
- paths: no absolute paths, no `..`, bounded depth and length, no member twice;
- kinds: files, folders, symlinks that stay inside the bundle (resolved through the
  bundle's other links) and hard links to a file earlier in it; no sparse files,
  devices or FIFOs.

Too large answers 413 (BundleTooLarge), anything else malformed 400 (InvalidBundle);
`field` is "bundle" or "bundle/<member path>".
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Self, cast

from thaw.core.errors import BundleTooLarge, InvalidBundle
from thaw.core.units import format_size

# Bundles carry code, not weights (weights come from volumes, packages or images).
# The packed bound is also the gateway's max_bundle_bytes default and must stay below
# core/grpcutil.py's MAX_MESSAGE_BYTES (a bundle travels in one gRPC message).
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
MAX_UNPACKED_BYTES = 512 * 1024 * 1024
MAX_BUNDLE_FILES = 10_000
MAX_PATH_DEPTH = 32
# Linux's PATH_MAX is 4096 for the whole path under the node's bundle folder.
MAX_PATH_BYTES = 1024
# Source code compresses 3-10x; a run of zeros over 1000x. The ratio is judged once
# this much has been unpacked, so small archives of tiny files (mostly headers, which
# compress very well) are never refused for it.
MAX_COMPRESSION_RATIO = 100.0
RATIO_FLOOR_BYTES = 16 * 1024 * 1024
MAX_TOML_BYTES = 256 * 1024
# Tar's own extended headers (PAX records, GNU long names) are read whole into memory
# by tarfile: bounded well above any real path.
MAX_HEADER_BYTES = 64 * 1024
# A tar stream holds per member a header, maybe a PAX header, and padding to 512.
_MEMBER_OVERHEAD = 4 * tarfile.BLOCKSIZE + 2 * MAX_PATH_BYTES
_TAR_TAIL = tarfile.RECORDSIZE * 2
_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                 tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
# What pack_bundle writes into every member and gzip header: a bundle's bytes depend
# on its files' paths, contents and executable bits only (a redeploy of an unchanged
# folder has the same digest and builds nothing).
PACK_MTIME = 0
PACK_COMPRESSLEVEL = 9
_SKIPPED_WHEN_PACKING = frozenset({"__pycache__", ".git", ".venv", ".thaw"})
_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class BundleLimits:
    """What a bundle may hold; every reader and packer takes one (defaults above)."""

    packed_bytes: int = MAX_BUNDLE_BYTES
    unpacked_bytes: int = MAX_UNPACKED_BYTES
    files: int = MAX_BUNDLE_FILES
    path_depth: int = MAX_PATH_DEPTH
    path_bytes: int = MAX_PATH_BYTES
    ratio: float = MAX_COMPRESSION_RATIO
    ratio_floor: int = RATIO_FLOOR_BYTES
    toml_bytes: int = MAX_TOML_BYTES


DEFAULT_LIMITS = BundleLimits()


def limits_for(packed_bytes: int) -> BundleLimits:
    """The limits of a bundle allowed up to `packed_bytes` packed (a tenant's
    max_bundle_bytes past the default): its unpacked bound grows in proportion, so a
    large bundle of weights that hardly compress still unpacks."""
    packed = max(packed_bytes, MAX_BUNDLE_BYTES)
    return BundleLimits(packed_bytes=packed, unpacked_bytes=max(
        MAX_UNPACKED_BYTES, packed * (MAX_UNPACKED_BYTES // MAX_BUNDLE_BYTES)))


@dataclass(frozen=True)
class BundleScan:
    """What reading a bundle found: its thaw.toml and its size."""

    toml: bytes
    members: int
    unpacked_bytes: int
    packed_bytes: int


def _too_large(what: str, limit: int | float, key: str, where: str = "bundle") -> BundleTooLarge:
    shown = format_size(int(limit)) if key.endswith("bytes") else f"{limit:g}"
    return BundleTooLarge(f"{what}: the limit ({key}) is {shown}", field=where)


class _Packed(io.RawIOBase):
    """The packed input, counted (the ratio's denominator)."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.source.read(len(buffer))
        buffer[:len(data)] = data
        self.count += len(data)
        return len(data)


class _Unpacked(io.RawIOBase):
    """The tar stream as it is decompressed, cut off past the limits: a bomb is
    refused after its first megabytes, never inflated whole."""

    def __init__(self, decoded: io.BufferedIOBase, packed: _Packed,
                 limits: BundleLimits) -> None:
        self.decoded = decoded
        self.packed = packed
        self.limits = limits
        self.count = 0
        self.ceiling = (limits.unpacked_bytes + (limits.files + 1) * _MEMBER_OVERHEAD
                        + _TAR_TAIL)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.decoded.read(len(buffer))
        buffer[:len(data)] = data
        self.count += len(data)
        if self.count > self.ceiling:
            raise _too_large("the bundle unpacks to more than its limit",
                             self.limits.unpacked_bytes, "unpacked_bytes")
        if (self.count > self.limits.ratio_floor
                and self.count > self.limits.ratio * max(self.packed.count, 1)):
            raise _too_large(f"the bundle unpacks to over {self.limits.ratio:g} times "
                             "its packed size (a compression bomb?)", self.limits.ratio,
                             "ratio")
        return len(data)


class _CheckedInfo(tarfile.TarInfo):
    """Refuses, from the header block alone, what tarfile would otherwise read whole
    into memory (huge extended headers) or expand (old GNU sparse files)."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        info = super().frombuf(buf, encoding, errors)
        if info.type == tarfile.GNUTYPE_SPARSE:
            raise InvalidBundle(f"sparse files are refused: {info.name!r}",
                                field=f"bundle/{info.name}")
        if info.type in _HEADER_TYPES and info.size > MAX_HEADER_BYTES:
            raise _too_large(f"a tar extended header of {info.size} bytes",
                             MAX_HEADER_BYTES, "header_bytes")
        return info


def _decoder(head: bytes, packed: _Packed) -> io.BufferedIOBase:
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=packed, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(packed, mode="rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(cast(IO[bytes], packed), mode="rb")
    return io.BufferedReader(packed)


def _relative(name: str) -> str:
    """A member name relative to the bundle's root ('' for the root itself)."""
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    return "" if name == "." else name


def _member_path(member: tarfile.TarInfo) -> str:
    return _relative(member.name)


@dataclass
class _Walk:
    """The checks over a bundle's members, in archive order."""

    limits: BundleLimits
    members: int = 0
    unpacked: int = 0
    seen: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)
    links: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Symlink path -> where it points, resolved inside the bundle."""

    def resolve(self, parts: list[str]) -> tuple[str, ...] | None:
        """Where `parts` lead from the root through the bundle's symlinks; None
        when they climb out of it."""
        out: list[str] = []
        for part in parts:
            if part in ("", "."):
                continue
            if part == "..":
                if not out:
                    return None
                out.pop()
                continue
            out.append(part)
            target = self.links.get("/".join(out))
            if target is not None:
                out = list(target)
        return tuple(out)

    def check(self, member: tarfile.TarInfo) -> str:
        """Refuse a member that breaks a rule; its path inside the bundle if not."""
        limits, raw = self.limits, member.name
        path = _member_path(member)
        where = f"bundle/{path or raw}"
        self.members += 1
        if self.members > limits.files:
            raise _too_large(f"the bundle has more than {limits.files} members",
                             limits.files, "files")
        if raw.startswith("/") or ".." in raw.split("/") or "\x00" in raw:
            raise InvalidBundle(f"unsafe path in bundle: {raw!r}", field=where)
        if len(path.encode(errors="surrogateescape")) > limits.path_bytes:
            raise InvalidBundle(f"a path in the bundle is longer than {limits.path_bytes} "
                                f"bytes (path_bytes): {path[:80]!r}...", field="bundle")
        if path.count("/") + 1 > limits.path_depth:
            raise InvalidBundle(f"{path!r} is nested deeper than {limits.path_depth} "
                                "folders (path_depth)", field=where)
        if member.issparse():
            raise InvalidBundle(f"sparse files are refused: {path!r}", field=where)
        if not path and not member.isdir():
            raise InvalidBundle(f"unsafe path in bundle: {raw!r}", field="bundle")
        if path in self.seen and not member.isdir():
            raise InvalidBundle(f"{path!r} appears twice in the bundle", field=where)
        self.seen.add(path)
        if member.isreg():
            self.unpacked += member.size
            if self.unpacked > limits.unpacked_bytes:
                raise _too_large(f"the bundle unpacks to more than its limit (at {path!r}, "
                                 f"{format_size(member.size)})", limits.unpacked_bytes,
                                 "unpacked_bytes", where)
            self.files.add(path)
        elif member.issym():
            self._check_symlink(member, path, where)
        elif member.islnk():
            if _relative(member.linkname) not in self.files:
                raise InvalidBundle(
                    f"{path!r} is a hard link to {member.linkname!r}, which is not a file "
                    "earlier in the bundle", field=where)
        elif not member.isdir():
            raise InvalidBundle(f"bundle may hold only files and folders (and links "
                                f"inside it): {path!r} is a device, FIFO or other special file",
                                field=where)
        return path

    def _check_symlink(self, member: tarfile.TarInfo, path: str, where: str) -> None:
        if not path:
            raise InvalidBundle("the bundle's root cannot be a symlink", field="bundle")
        target = member.linkname
        # Where the link really is (its folder may be reached through another link):
        # later paths through it are resolved from there.
        folder = self.resolve(path.split("/")[:-1])
        resolved = None
        if folder is not None and target and not target.startswith("/"):
            resolved = self.resolve([*folder, *target.split("/")])
        if folder is None or resolved is None:
            raise InvalidBundle(
                f"bundle may hold only files and folders, and links that stay inside it: "
                f"{path!r} points to {target!r}", field=where)
        self.links["/".join([*folder, path.rsplit("/", 1)[-1]])] = resolved


def _members(tar: tarfile.TarFile, walk: _Walk,
             on_toml: Callable[[tarfile.TarInfo], None]) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        path = walk.check(member)
        if path == "thaw.toml":
            on_toml(member)
        yield member


def _open(data: bytes, limits: BundleLimits) -> tuple[_Packed, _Unpacked]:
    if not data:
        raise InvalidBundle("the bundle is empty", field="bundle")
    if len(data) > limits.packed_bytes:
        raise _too_large(f"the bundle is {format_size(len(data))} packed",
                         limits.packed_bytes, "packed_bytes")
    packed = _Packed(io.BytesIO(data))
    return packed, _Unpacked(_decoder(data[:6], packed), packed, limits)


def _unreadable(exc: BaseException) -> InvalidBundle:
    return InvalidBundle(f"the bundle is not a readable tar archive: {exc}", field="bundle")


_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError)


def scan_bundle(data: bytes, limits: BundleLimits = DEFAULT_LIMITS) -> BundleScan:
    """Check every member of a bundle against the limits, reading it once as a stream
    (nothing is written), and return its thaw.toml."""
    packed, unpacked = _open(data, limits)
    walk = _Walk(limits)
    found: list[bytes] = []

    def read_toml(member: tarfile.TarInfo) -> None:
        found.append(_toml_of(tar, member, limits))

    try:
        with tarfile.open(fileobj=unpacked, mode="r|", tarinfo=_CheckedInfo) as tar:
            for _member in _members(tar, walk, read_toml):
                pass
    except _TAR_ERRORS as exc:
        raise _unreadable(exc) from exc
    if not found:
        raise InvalidBundle("the bundle has no thaw.toml at its root", field="thaw.toml")
    return BundleScan(toml=found[0], members=walk.members, unpacked_bytes=walk.unpacked,
                      packed_bytes=len(data))


def _toml_of(tar: tarfile.TarFile, member: tarfile.TarInfo, limits: BundleLimits) -> bytes:
    if not member.isreg():
        kind = "folder" if member.isdir() else "link" if member.issym() or member.islnk() \
            else "special file"
        raise InvalidBundle(f"thaw.toml must be a file, but the bundle's is a {kind}",
                            field="thaw.toml")
    if member.size > limits.toml_bytes:
        raise _too_large(f"thaw.toml is {format_size(member.size)}", limits.toml_bytes,
                         "toml_bytes", "thaw.toml")
    handle = tar.extractfile(member)
    if handle is None:  # pragma: no cover - a regular member always has a handle
        raise InvalidBundle("thaw.toml cannot be read", field="thaw.toml")
    return handle.read()


def extract_bundle(data: bytes, dest: str, limits: BundleLimits = DEFAULT_LIMITS) -> None:
    """Unpack a bundle into `dest` (made here), checking every member as it streams
    by: past a limit nothing more is written, and `dest` is removed again."""
    packed, unpacked = _open(data, limits)
    walk = _Walk(limits)
    os.makedirs(dest)
    try:
        with tarfile.open(fileobj=unpacked, mode="r|", tarinfo=_CheckedInfo) as tar:
            tar.extractall(dest, members=_members(tar, walk, lambda _m: None),
                           filter="data")
    except BaseException as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if isinstance(exc, _TAR_ERRORS) and not isinstance(exc, InvalidBundle):
            raise _unreadable(exc) from exc
        raise


def pack_bundle(folder: str, limits: BundleLimits = DEFAULT_LIMITS) -> bytes:
    """A gzip'd tarball of a bundle folder, thaw.toml at its root (the CLI and tests).

    Refuses, naming the path, what a reader would refuse (special files, links out of
    the folder, past a limit) before compressing more of it; symlinks that stay
    inside are kept as links. Reproducible: members in sorted order, times, owners
    and modes normalised (_reproducible), gzip's header without time or name."""
    root = os.path.realpath(folder)
    buf = io.BytesIO()
    members, unpacked = 0, 0
    # gzip's header carries a time and a file name: both fixed, so the same folder
    # packs to the same bytes (and digest) every time.
    with (gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0,
                        compresslevel=PACK_COMPRESSLEVEL) as packed,
          tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as tar):
        for here, dirs, files in os.walk(folder):
            kept = sorted(d for d in dirs if d not in _SKIPPED_WHEN_PACKING)
            # os.walk lists a symlink to a folder among the folders: it is packed as
            # the link it is, and not descended into.
            dirs[:] = [d for d in kept if not os.path.islink(os.path.join(here, d))]
            names = [(d, True) for d in kept]
            names += [(f, False) for f in sorted(files) if not f.endswith(".pyc")]
            for name, is_dir in names:
                path = os.path.join(here, name)
                rel = os.path.relpath(path, folder)
                where = f"bundle/{rel}"
                mode = os.lstat(path).st_mode
                if is_dir and not stat.S_ISLNK(mode):
                    continue  # folders come with their files
                members += 1
                if members > limits.files:
                    raise _too_large(f"{folder} has more than {limits.files} files",
                                     limits.files, "files")
                if rel.count(os.sep) + 1 > limits.path_depth:
                    raise InvalidBundle(f"{rel} is nested deeper than {limits.path_depth} "
                                        "folders (path_depth)", field=where)
                if stat.S_ISLNK(mode):
                    _add_link(tar, path, rel, root, where)
                    continue
                if not stat.S_ISREG(mode):
                    raise InvalidBundle(f"{rel} is a device, FIFO or socket: a bundle holds "
                                        "only files, folders and links", field=where)
                unpacked += os.lstat(path).st_size
                if unpacked > limits.unpacked_bytes:
                    raise _too_large(f"{folder} holds more than its limit (at {rel})",
                                     limits.unpacked_bytes, "unpacked_bytes", where)
                tar.add(path, arcname=rel, recursive=False, filter=_reproducible)
    data = buf.getvalue()
    if len(data) > limits.packed_bytes:
        raise _too_large(f"{folder} packs to {format_size(len(data))}",
                         limits.packed_bytes, "packed_bytes")
    return data


def _add_link(tar: tarfile.TarFile, path: str, rel: str, root: str, where: str) -> None:
    resolved = os.path.realpath(path)
    if resolved != root and not resolved.startswith(root + os.sep):
        raise InvalidBundle(f"{rel} is a symlink to {os.readlink(path)}, outside the "
                            "bundle folder: copy what it points to into the folder",
                            field=where)
    info = _reproducible(tar.gettarinfo(path, arcname=rel))
    info.linkname = os.path.relpath(resolved, os.path.dirname(os.path.join(root, rel)))
    tar.addfile(info)


def _reproducible(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """The member as every machine and every checkout packs it: what only says when
    or by whom a file was written (times, owners) is fixed, and the mode keeps only
    whether the file is executable, so a digest changes only with content."""
    info.mtime = PACK_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if info.issym():
        info.mode = 0o777
    else:
        info.mode = 0o755 if info.mode & 0o111 else 0o644
    info.pax_headers = {}
    return info
