"""Output files of stored invocations (docs/function-api.md, "Files").

A stored call whose handler returned paths answers FILES_CONTENT_TYPE, the files'
bytes inside. When its outcome is read (outcome.keep_files), before it is stored,
each file goes to the file store (gateway/filestore.py) for as long as the result is
retained (result_ttl_seconds, and a minute more), and the result is recorded as
FILE_REFS_TYPE: the same JSON with each file replaced by a reference to its id and
expiry. Every read of the result (GET /v1/invocations/{id}[/result], a stored
prediction, a webhook delivery, the submitting call's own answer) turns the
references into signed URLs that expire files_url_ttl_seconds from that read, never
after the file: a result read hours later still gives working URLs while the
invocation is retained. The files expire with the result and the file sweep
collects them; while kept they count against the tenant's files_max_bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from thaw.gateway import jsonbody
from thaw.gateway.files import FILES_KEY, FILES_PATH, Files, decode_marker
from thaw.gateway.origins import FUNCTION_ORIGIN_KEY, function_base_url
from thaw.gateway.state import CONFIG_KEY
from thaw.snapshotter.runtime.files import FILE_MARKER

FILE_REFS_TYPE = "application/vnd.thaw.file-refs+json"
"""A stored result's content type when its files are in the file store."""
REF_MARKER = "__thaw_stored_file__"
# A stored result's files outlive it by this much (the result's expiry is set by the
# scheduler a moment after they are stored).
KEEP_SLACK_SECONDS = 60.0


def is_refs(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == FILE_REFS_TYPE


def store_files(files: Files, tenant: str, body: bytes, keep_seconds: float) -> bytes:
    """An answer of FILES_CONTENT_TYPE as FILE_REFS_TYPE: each file stored for
    `keep_seconds`. Blocking (base64 and disk): run it in a worker thread. Raises
    ValueError for JSON that is not, ThawError for a bad file or a full quota."""
    value = jsonbody.loads(body)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            marker = node.get(FILE_MARKER) if len(node) == 1 else None
            if isinstance(marker, dict):
                data, name, content_type = decode_marker(marker)
                stored = files.store.put(tenant, data, content_type, name, keep_seconds)
                return {REF_MARKER: {"id": stored.file_id, "expires": stored.expires}}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return json.dumps(walk(value), separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Links:
    """Mints the URLs of stored files: the app's store and signer, and the function
    origin's URL they are served on."""

    files: Files
    base: str

    def url(self, tenant: str, file_id: str, file_expires: float) -> str:
        now = self.files.signer.clock()
        expires = min(math.ceil(now + self.files.ttl), math.floor(file_expires))
        token = self.files.signer.sign(tenant, file_id, expires)
        return f"{self.base}{FILES_PATH}{token}"

    def value(self, tenant: str, body: bytes) -> Any:
        """A FILE_REFS_TYPE result's JSON value, each reference a fresh signed URL."""
        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                ref = node.get(REF_MARKER) if len(node) == 1 else None
                if isinstance(ref, dict) and isinstance(ref.get("id"), str):
                    return self.url(tenant, ref["id"], float(ref.get("expires") or 0))
                return {k: walk(v) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v) for v in node]
            return node
        return walk(jsonbody.loads(body))

    def response(self, tenant: str, status: int, body: bytes,
                 headers: dict[str, str]) -> web.Response:
        """A FILE_REFS_TYPE result answered as a sync call's: JSON with URLs."""
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        return web.json_response(self.value(tenant, body), status=status or 200,
                                 headers=headers,
                                 dumps=lambda v: json.dumps(v, ensure_ascii=False))


def links_of(request: web.Request) -> Links | None:
    """Links on the function origin the request names; None in an app without the
    files feature."""
    files = request.app.get(FILES_KEY)
    if files is None:
        return None
    return Links(files, function_base_url(request, request.app[CONFIG_KEY].public_url))


def app_links(app: web.Application) -> Links | None:
    """Links for work apart from a request (webhooks): the operator's public_url,
    else the function listener's address (a wildcard one named 127.0.0.1)."""
    files = app.get(FILES_KEY)
    if files is None:
        return None
    public_url = app[CONFIG_KEY].public_url
    if public_url:
        return Links(files, public_url.rstrip("/"))
    origin = app.get(FUNCTION_ORIGIN_KEY)
    if origin is None or not origin.port:
        return Links(files, "")
    host = origin.host or app[CONFIG_KEY].function_host or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return Links(files, f"http://{host}:{origin.port}")
