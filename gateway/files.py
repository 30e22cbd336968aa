"""Files in and out of function calls (docs/function-api.md, "Files").

In: an input whose schema is `{"type": "string", "format": "uri"}` (a handler
parameter annotated pathlib.Path, cog's Path or File) takes a file, sent as a part of
a `multipart/form-data` body (its other fields are the other inputs), as a `data:`
URI in the JSON body, or as a URL this platform signed (an output of an earlier
call of the same tenant). The gateway turns each into a `data:` URI in the JSON the
instance gets; the runtime writes it into the instance's private /tmp and the
handler gets a path (snapshotter/runtime/files.py). The form body is bounded by the
function's body limit and `max_input_files`; files fetched by URL by that limit too.

Out: an answer of FILES_CONTENT_TYPE (a handler returned paths) has each file stored
(gateway/filestore.py) and replaced by `{function origin}/files/{token}`: signed,
expiring after `files_url_ttl_seconds`, read without an API key.
`GET /files/{token}` answers the bytes with their media type and a
Content-Disposition naming the file.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import structlog
from aiohttp import web

from thaw.core.errors import InvalidArgument, NotFound, ThawError
from thaw.gateway import jsonbody
from thaw.gateway.dispatch import Exchange
from thaw.gateway.errors import InputRejected, PayloadTooLarge
from thaw.gateway.filestore import (
    FileSigner,
    FilesQuotaExceeded,
    FileStore,
    FileUrlRefused,
    load_key,
)
from thaw.gateway.multipart import Part, is_form, parse_form
from thaw.gateway.origins import function_base_url
from thaw.gateway.relay import answer_headers
from thaw.gateway.state import CONFIG_KEY
from thaw.snapshotter.runtime.files import FILE_MARKER, FILES_CONTENT_TYPE

log = structlog.get_logger()

FILES_PATH = "/files/"
JSON = "application/json"
# Bodies past this are parsed in a worker thread, off the event loop.
INLINE_PARSE_BYTES = 256 * 1024
# Room for an answer's JSON around its files' base64 (names, other values).
MARKER_SLACK_BYTES = 1024 * 1024
# Expired files are swept at most this often (sooner with a shorter TTL).
SWEEP_SECONDS = 300.0


class Files:
    """The store, the signer and the limits, one per app (FILES_KEY)."""

    def __init__(self, store: FileStore, signer: FileSigner, ttl: float,
                 max_input_files: int) -> None:
        self.store = store
        self.signer = signer
        self.ttl = ttl
        self.max_input_files = max_input_files

    @classmethod
    def from_settings(cls, home: Path, files_dir: str, ttl: float, max_bytes: int,
                      max_input_files: int) -> Files:
        root = Path(files_dir) if files_dir else home / "files"
        return cls(FileStore(root, max_bytes), FileSigner(load_key(root)), ttl,
                   max_input_files)


FILES_KEY = web.AppKey("files", Files)


def files_of(request: web.Request) -> Files:
    return request.app[FILES_KEY]


# ---- inputs ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def file_fields(schema_json: str) -> dict[str, bool]:
    """The inputs of a schema that take files: name -> whether it takes a list."""
    if '"uri"' not in schema_json:
        return {}
    try:
        schema = json.loads(schema_json)
    except (ValueError, RecursionError):
        return {}
    properties = schema.get("properties") if isinstance(schema, dict) else None
    found: dict[str, bool] = {}
    for name, prop in (properties or {}).items():
        if not isinstance(prop, dict):
            continue
        branches = [prop, *[b for b in prop.get("anyOf", ()) if isinstance(b, dict)]]
        for branch in branches:
            if branch.get("format") == "uri":
                found[name] = False
            items = branch.get("items")
            if branch.get("type") == "array" and isinstance(items, dict) and items.get(
                    "format") == "uri":
                found[name] = True
    return found


def _types_of(schema_json: str) -> dict[str, set[str]]:
    try:
        schema = json.loads(schema_json) if schema_json else {}
    except (ValueError, RecursionError):
        return {}
    properties = schema.get("properties") if isinstance(schema, dict) else None
    types: dict[str, set[str]] = {}
    for name, prop in (properties or {}).items():
        if isinstance(prop, dict):
            branches = [prop, *[b for b in prop.get("anyOf", ()) if isinstance(b, dict)]]
            types[name] = {b["type"] for b in branches if isinstance(b.get("type"), str)}
            if "enum" in prop:
                types[name].update(type(v).__name__ for v in prop["enum"])
    return types


def data_uri(data: bytes | bytearray, content_type: str, filename: str | None) -> str:
    media = content_type.split(";")[0].strip() or "application/octet-stream"
    name = f";name={quote(filename, safe='')}" if filename else ""
    return f"data:{media}{name};base64,{base64.b64encode(data).decode()}"


def _field_value(raw: str, types: set[str]) -> Any:
    """A form field as the input's type: a string stays one; an input that takes no
    string (a number, a boolean, a list) is read as JSON."""
    if not types or "string" in types or "str" in types:
        return raw
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw  # the input check names the input and its type


def form_to_inputs(parts: list[Part], schema_json: str) -> dict[str, Any]:
    """A parsed form as the call's inputs: fields by the schema's types, file parts
    as data: URIs; raises InputRejected for a file sent to an input that takes none,
    and InvalidArgument for a name given twice that takes no list."""
    fields = file_fields(schema_json)
    types = _types_of(schema_json)
    inputs: dict[str, Any] = {}
    for part in parts:
        if part.is_file:
            if types and part.name not in fields:
                raise InputRejected(f"input {part.name!r} takes no file", field=part.name)
            value: Any = data_uri(part.data, part.content_type, part.filename)
        else:
            value = _field_value(part.data.decode("utf-8", "replace"),
                                 types.get(part.name, set()))
        if fields.get(part.name):
            inputs.setdefault(part.name, []).append(value)
        elif part.name in inputs:
            raise InvalidArgument(f"the form gives {part.name!r} twice; it takes one "
                                  "value", field=part.name)
        else:
            inputs[part.name] = value
    return inputs


async def form_body(request: web.Request, schema_json: str, body: bytes) -> bytes:
    """A `multipart/form-data` call's body as the JSON of its inputs (file parts as
    data: URIs); any other body as it is."""
    content_type = request.headers.get("Content-Type", "")
    if not is_form(content_type):
        return body
    limit = files_of(request).max_input_files

    def convert() -> bytes:
        inputs = form_to_inputs(parse_form(content_type, body, limit), schema_json)
        return json.dumps(inputs, separators=(",", ":"), ensure_ascii=False).encode()
    return await asyncio.to_thread(convert) if len(body) > 64 * 1024 else convert()


def _signed_token(value: str) -> str | None:
    """The token of a URL of the form .../files/{token}; None for another value."""
    if not value.startswith(("http://", "https://")):
        return None
    try:
        path = urlsplit(value).path
    except ValueError:
        return None
    head, sep, token = path.rpartition(FILES_PATH)
    return token if sep and not head and token and "/" not in token else None


async def _resolve_value(files: Files, tenant: str, name: str, value: Any,
                         budget: list[int]) -> Any:
    if value is None or (isinstance(value, str) and value.startswith("data:")):
        return value  # None: an Optional file left empty (the schema check allowed it)
    token = _signed_token(value) if isinstance(value, str) else None
    if token is None:
        raise InputRejected(f"input {name!r} takes a file: a data: URI, a part of a "
                            "multipart/form-data body, or a file URL this platform "
                            "signed (other URLs are not fetched)", field=name)
    try:
        signed = files.signer.verify(token)
    except FileUrlRefused as exc:
        raise InputRejected(f"input {name!r}: {exc.message}", field=name) from None
    if signed.tenant != tenant:
        raise InputRejected(f"input {name!r}: this file URL was issued to another "
                            "tenant", field=name)
    try:
        meta, data = await asyncio.to_thread(files.store.read, tenant, signed.file_id)
    except NotFound as exc:
        raise InputRejected(f"input {name!r}: {exc.message}", field=name) from None
    budget[0] -= len(data)
    if budget[0] < 0:
        raise PayloadTooLarge(f"input {name!r}: the files given by URL are larger than "
                              "the function's body limit", field=name)
    return data_uri(data, meta.content_type, meta.name)


async def resolve_inputs(request: web.Request, tenant: str, schema_json: str,
                         body: bytes, limit: int) -> bytes:
    """The call's JSON body with each file input given as a signed URL replaced by a
    data: URI of its bytes (within `limit` bytes in all); other values as they are.
    InputRejected (422) names an input given a URL that is not a live signed URL of
    the caller's tenant, any other URL (never fetched) or a value that is no file.
    Functions without file inputs pay one substring test (file_fields)."""
    fields = file_fields(schema_json)
    if not fields:
        return body
    try:
        inputs = (await asyncio.to_thread(jsonbody.loads, body)
                  if len(body) > INLINE_PARSE_BYTES else jsonbody.loads(body))
    except ValueError:
        return body  # the input check answers for it
    if not isinstance(inputs, dict):
        return body
    files = files_of(request)
    budget = [limit]
    changed = False
    for name, many in fields.items():
        if name not in inputs:
            continue
        value = inputs[name]
        if many and isinstance(value, list):
            new: Any = [await _resolve_value(files, tenant, f"{name}.{i}", v, budget)
                        for i, v in enumerate(value)]
        else:
            new = await _resolve_value(files, tenant, name, value, budget)
        changed = changed or new is not value
        inputs[name] = new
    if not changed:
        return body
    return json.dumps(inputs, separators=(",", ":"), ensure_ascii=False).encode()


# ---- outputs --------------------------------------------------------------------------


def carries_files(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == FILES_CONTENT_TYPE


async def publish(request: web.Request, tenant: str, body: bytes) -> Any:
    """An answer of FILES_CONTENT_TYPE as its JSON value, each file stored and
    replaced by its signed URL on the function origin the request names."""
    base = function_base_url(request, request.app[CONFIG_KEY].public_url)
    return await publish_value(files_of(request), base, tenant, body)


async def publish_value(files: Files, base: str, tenant: str, body: bytes) -> Any:
    """`publish` without a request: `base` is the function origin's URL (the
    operator's public_url, say), for work that runs apart from a call."""
    value = jsonbody.loads(body)

    async def walk(node: Any) -> Any:
        if isinstance(node, dict):
            marker = node.get(FILE_MARKER) if len(node) == 1 else None
            if isinstance(marker, dict):
                return await _store_one(files, tenant, base, marker)
            return {k: await walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [await walk(v) for v in node]
        return node
    return await walk(value)


def decode_marker(marker: dict[str, Any]) -> tuple[bytes, str, str]:
    """A FILE_MARKER's file: its bytes, name and media type (ThawError for bad base64)."""
    try:
        data = base64.b64decode(str(marker.get("data", "")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ThawError(f"the function's output file is not valid base64: {exc}") from None
    name = str(marker.get("name") or "output")
    return data, name, str(marker.get("type") or "application/octet-stream")


async def _store_one(files: Files, tenant: str, base: str, marker: dict[str, Any]) -> str:
    data, name, content_type = decode_marker(marker)
    stored = await asyncio.to_thread(files.store.put, tenant, data, content_type, name,
                                     files.ttl)
    token = files.signer.sign(tenant, stored.file_id, math.ceil(stored.expires))
    return f"{base}{FILES_PATH}{token}"


async def file_answer(request: web.Request, tenant: str, ex: Exchange) -> web.Response:
    """A function call's answer that carries files: JSON with their URLs, the
    platform's headers as relay.py gives them. An answer larger than the tenant's
    files_max_bytes could hold (base64 and all) is refused before it is read."""
    files = files_of(request)
    length = ex.upstream.content_length
    if length is not None and length > files.store.max_bytes * 4 // 3 + MARKER_SLACK_BYTES:
        raise FilesQuotaExceeded(
            f"the function returned files of about {length * 3 // 4} bytes, more than "
            f"files_max_bytes ({files.store.max_bytes}) holds", field="output")
    body = await ex.read()
    headers = answer_headers(ex, True)
    headers.pop("Content-Type", None)
    value = await publish(request, tenant, body)
    return web.json_response(value, status=ex.status, headers=headers,
                             dumps=lambda v: json.dumps(v, ensure_ascii=False))


# ---- GET /files/{token} -------------------------------------------------------------


async def get_file(request: web.Request) -> web.StreamResponse:
    """The bytes a signed URL names; no API key: the signature is the permission."""
    files = files_of(request)
    signed = files.signer.verify(request.match_info["token"])
    meta, path = await asyncio.to_thread(files.store.open, signed.tenant, signed.file_id)
    disposition = "attachment; filename*=UTF-8''" + quote(meta.name, safe="")
    seconds_left = max(0, int(signed.expires - files.signer.clock()))
    return web.FileResponse(path, headers={
        "Content-Type": meta.content_type, "Content-Disposition": disposition,
        "Cache-Control": f"private, max-age={seconds_left}"})


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    files = Files.from_settings(Path(config.home), config.files_dir,
                                config.files_url_ttl_seconds, config.files_max_bytes,
                                config.max_input_files)
    app[FILES_KEY] = files
    every = min(SWEEP_SECONDS, max(1.0, files.ttl))

    async def sweep() -> None:
        while True:
            await asyncio.sleep(every)
            try:
                removed = await asyncio.to_thread(files.store.sweep)
            except OSError as exc:
                log.warning("output file sweep failed", error=str(exc))
                continue
            if removed:
                log.info("expired output files removed", files=removed)
    task = asyncio.ensure_future(sweep())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def add_routes(app: web.Application) -> None:
    app.router.add_get("/files/{token}", get_file)
    app.cleanup_ctx.append(_sweeper)


OPENAPI_PATHS: dict[str, Any] = {
    "/files/{token}": {"get": {
        "summary": "A function's output file, by the signed URL its answer gave",
        "description": "No API key: the URL's signature is the permission. It expires "
                       "files_url_ttl_seconds after the answer (docs/function-api.md, "
                       "\"Files\").",
        "tags": ["functions"], "security": [],
        "parameters": [{"name": "token", "in": "path", "required": True,
                        "schema": {"type": "string", "maxLength": 1024,
                                   "pattern": r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$"}}],
        "responses": {
            "200": {"description": "The file, with its media type and "
                                   "Content-Disposition."},
            "403": {"description": "The URL is malformed, forged or expired."},
            "404": {"description": "The file is no longer stored."},
            "431": {"description": "The URL is past the gateway's bounds on a request "
                                   "head (docs/limits.md)."}}}},
}
