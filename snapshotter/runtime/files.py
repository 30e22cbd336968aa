"""File inputs and outputs of a handler, inside the instance (docs/function-api.md,
"Files").

Inputs: a parameter annotated `pathlib.Path` (cog's `Path` too, a subclass) or cog's
`File` takes a file. The gateway sends every file as a `data:` URI in the call's JSON
(a multipart part or a signed file URL becomes one there), and `materialise` writes
it into a fresh folder of the instance's private /tmp: the handler gets a real path
(an open binary file for `File`), removed once the answer is made.

Outputs: a handler that returns a path (alone, or inside lists and dicts) answers
FILES_CONTENT_TYPE: its JSON with each path replaced by a FILE_MARKER object holding
the file's name, media type and bytes (base64). The gateway stores each file and puts
a signed, expiring URL in its place (gateway/files.py); the caller never sees the
marker.

Only the stdlib, as for the whole runtime.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import inspect
import io
import mimetypes
import os
import pathlib
import re
import shutil
import tempfile
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

FILES_CONTENT_TYPE = "application/vnd.thaw.files+json"
"""An answer whose JSON holds FILE_MARKER objects (the gateway replaces them)."""
FILE_MARKER = "$thaw.file"
"""{FILE_MARKER: {"name", "type", "data"}}: one output file, base64 in "data"."""
FILE_SCHEMA: dict[str, Any] = {"type": "string", "format": "uri"}
"""How a file input or output shows in the schema (as cog writes it)."""
# Kinds of file parameter.
PATH, FILE, PATH_LIST, FILE_LIST = "path", "file", "path_list", "file_list"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")
MAX_NAME_CHARS = 128


class FileInputError(ValueError):
    """A file input that is not a readable data: URI (the runtime answers 400)."""


class HasFiles(TypeError):
    """Raised while encoding JSON when a value is a path: the answer carries files."""


def _path_class(hint: Any) -> type | None:
    """The class a file parameter's value is made with (pathlib.Path or a subclass),
    cog's File (io.IOBase), or None for a hint that is no file."""
    if isinstance(hint, type):
        if issubclass(hint, pathlib.PurePath):
            return pathlib.Path if hint in (pathlib.PurePath, pathlib.PurePosixPath) else hint
        if issubclass(hint, io.IOBase) and hint.__module__.split(".")[0] == "cog":
            return hint
    return None


def is_file_type(hint: Any) -> bool:
    """A type hint that stands for a file (its schema is FILE_SCHEMA)."""
    return _path_class(hint) is not None


def _kind(hint: Any) -> str | None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        return _kind(members[0]) if len(members) == 1 else None
    if origin in (list, tuple, typing.Sequence) or (
            origin is not None and getattr(origin, "__name__", "") == "Sequence"):
        args = typing.get_args(hint)
        inner = _kind(args[0]) if args else None
        return {PATH: PATH_LIST, FILE: FILE_LIST}.get(inner or "")
    found = _path_class(hint)
    if found is None:
        return None
    return FILE if issubclass(found, io.IOBase) else PATH


def file_params(func: Any) -> dict[str, tuple[str, type]]:
    """The parameters of `func` that take files: name -> (kind, the class made)."""
    try:
        hints = typing.get_type_hints(func)
        names = inspect.signature(func).parameters
    except (TypeError, ValueError, NameError):
        return {}
    found: dict[str, tuple[str, type]] = {}
    for name in names:
        hint = hints.get(name)
        kind = _kind(hint) if hint is not None else None
        if kind is not None:
            found[name] = (kind, _made_class(hint))
    return found


def _made_class(hint: Any) -> type:
    found = _path_class(hint)
    if found is not None:
        return found
    for arg in typing.get_args(hint):
        inner = _made_class(arg)
        if inner is not pathlib.Path or _path_class(arg) is pathlib.Path:
            return inner
    return pathlib.Path


def parse_data_uri(uri: str) -> tuple[bytes, str, str]:
    """(bytes, media type, file name) of a `data:[type][;name=..][;base64],DATA` URI;
    raises FileInputError."""
    if not uri.startswith("data:") or "," not in uri:
        raise FileInputError("a file input is a data: URI (data:[type][;base64],DATA) or "
                             "a file URL this platform signed")
    head, _, payload = uri[5:].partition(",")
    params = head.split(";")
    media = params[0].strip().lower() or "text/plain"
    name = ""
    encoded = False
    for param in params[1:]:
        key, _, value = param.partition("=")
        key = key.strip().lower()
        if key == "base64" and not value:
            encoded = True
        elif key in ("name", "filename"):
            name = unquote(value.strip().strip('"'))
    try:
        data = (base64.b64decode(payload, validate=True) if encoded
                else unquote_to_bytes(payload))
    except (binascii.Error, ValueError) as exc:
        raise FileInputError(f"a file input's base64 is not valid: {exc}") from None
    return data, media, name


def safe_name(name: str, media: str) -> str:
    """A file name without folders or odd characters, with an extension from the
    media type when it has none."""
    base = _SAFE_NAME.sub("_", os.path.basename(name.replace("\\", "/"))).strip(" .")
    base = base[-MAX_NAME_CHARS:]
    if not base:
        base = "input" + (mimetypes.guess_extension(media) or "")
    return base


class Scratch:
    """The folder one call's input files were written to; removed by cleanup()."""

    def __init__(self) -> None:
        self.folder: str | None = None
        self.opened: list[io.IOBase] = []

    def write(self, index: int, data: bytes, media: str, name: str) -> pathlib.Path:
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="thaw-files-")
        # One subfolder per file: two inputs may carry the same name.
        folder = os.path.join(self.folder, str(index))
        os.mkdir(folder, 0o700)
        path = pathlib.Path(folder, safe_name(name, media))
        with open(path, "wb") as out:
            out.write(data)
        return path

    def cleanup(self) -> None:
        for handle in self.opened:
            with contextlib.suppress(OSError):
                handle.close()
        self.opened.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def materialise(inputs: dict[str, Any], params: dict[str, tuple[str, type]]
                ) -> tuple[dict[str, Any], Scratch]:
    """`inputs` with each file parameter's data: URI written to a file and replaced by
    its path (or open file); raises FileInputError naming the input."""
    scratch = Scratch()
    out = dict(inputs)
    count = 0
    try:
        for name, (kind, made) in params.items():
            value = inputs.get(name)
            if value is None or isinstance(value, (pathlib.PurePath, io.IOBase)):
                continue  # None for an Optional file; a default path as it is
            many = kind in (PATH_LIST, FILE_LIST)
            values = value if many and isinstance(value, list) else [value]
            made_values = []
            for item in values:
                if not isinstance(item, str):
                    raise FileInputError(f"input {name!r} takes a file (a data: URI)")
                try:
                    data, media, filename = parse_data_uri(item)
                except FileInputError as exc:
                    raise FileInputError(f"input {name!r}: {exc}") from None
                path = scratch.write(count, data, media, filename)
                count += 1
                if kind in (FILE, FILE_LIST):
                    handle = open(path, "rb")  # noqa: SIM115 (closed by cleanup)
                    scratch.opened.append(handle)
                    made_values.append(handle)
                else:
                    made_values.append(made(path))
            out[name] = made_values if many else made_values[0]
    except BaseException:
        scratch.cleanup()
        raise
    return out, scratch


def after_stream(items: Iterator[Any], cleanup: Callable[[], None]) -> Iterator[Any]:
    """The items of a streamed answer, with `cleanup` run once they end or stop."""
    try:
        yield from items
    finally:
        cleanup()


def _marker(path: pathlib.PurePath | io.IOBase) -> dict[str, Any]:
    if isinstance(path, io.IOBase):
        name = str(getattr(path, "name", "") or "output")
        data = path.read()
        if isinstance(data, str):
            data = data.encode()
    else:
        name = str(path)
        with open(path, "rb") as handle:
            data = handle.read()
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return {FILE_MARKER: {"name": safe_name(name, media), "type": media,
                          "data": base64.b64encode(data).decode()}}


def with_markers(value: Any) -> Any:
    """`value` with every path (and cog File) in it, through lists, tuples and dicts,
    replaced by its FILE_MARKER object; raises OSError for a path that cannot be read."""
    if isinstance(value, (pathlib.PurePath, io.IOBase)):
        return _marker(value)
    if isinstance(value, dict):
        return {k: with_markers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [with_markers(v) for v in value]
    return value


def is_file_value(value: Any) -> bool:
    return isinstance(value, (pathlib.PurePath, io.IOBase))
