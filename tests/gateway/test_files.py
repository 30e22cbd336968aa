"""Files in and out of calls, below the platform: the URL signer (forged, expired,
another tenant's), the output file store (TTL, quota, sweep), the multipart parser's
limits, a form as typed inputs, the file route, and the runtime's side (a data: URI
written to a path the handler gets; a returned path sent as a file)."""

from __future__ import annotations

import base64
import json
import pathlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import cog
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from thaw.core.errors import InvalidArgument, NotFound, QuotaExceeded, ThawError
from thaw.gateway.dispatch import Exchange
from thaw.gateway.errors import InputRejected, error_response
from thaw.gateway.files import (
    FILES_KEY,
    Files,
    data_uri,
    file_answer,
    file_fields,
    form_to_inputs,
    get_file,
    publish_value,
    resolve_inputs,
)
from thaw.gateway.filestore import FileSigner, FileStore, FileUrlRefused, load_key
from thaw.gateway.multipart import parse_form
from thaw.snapshotter.runtime.files import (
    FILE_MARKER,
    FILES_CONTENT_TYPE,
    FileInputError,
    materialise,
    parse_data_uri,
)
from thaw.snapshotter.runtime.handler import InvalidInput, Invoker, Payload, Request
from thaw.snapshotter.runtime.signature import signature_schema


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


KEY = b"k" * 32


# ---- the signer ----------------------------------------------------------------------

def test_a_signed_token_names_its_tenant_file_and_expiry() -> None:
    clock = Clock()
    signer = FileSigner(KEY, clock)
    token = signer.sign("acme", "ab" * 32, 1_000_060)
    got = signer.verify(token)
    assert (got.tenant, got.file_id, got.expires) == ("acme", "ab" * 32, 1_000_060)


def test_a_forged_or_altered_token_is_refused() -> None:
    signer = FileSigner(KEY, Clock())
    token = signer.sign("acme", "ab" * 32, 1_000_060)
    payload, mac = token.split(".")
    # Another key's signature, the payload changed (tenant, file, a later expiry), junk.
    other = FileSigner(b"x" * 32, Clock()).sign("acme", "ab" * 32, 1_000_060)
    longer = FileSigner(KEY, Clock()).sign("acme", "ab" * 32, 9_000_000).split(".")[0]
    for forged in (other, f"{longer}.{mac}", f"{payload}.{mac[:-2]}AA", "nodot", "%%.%%"):
        with pytest.raises(FileUrlRefused) as refused:
            signer.verify(forged)
        assert refused.value.field == "token"
    with pytest.raises(FileUrlRefused, match="signature does not match"):
        signer.verify(other)


def test_a_token_past_its_expiry_is_refused_saying_so() -> None:
    clock = Clock()
    signer = FileSigner(KEY, clock)
    token = signer.sign("acme", "ab" * 32, int(clock.now) + 60)
    signer.verify(token)
    clock.now += 60
    with pytest.raises(FileUrlRefused, match="expired at"):
        signer.verify(token)


def test_the_key_is_made_once_private_and_reused(tmp_path: Path) -> None:
    key = load_key(tmp_path / "files")
    assert len(key) == 32 and load_key(tmp_path / "files") == key
    assert (tmp_path / "files" / "url.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError):
        FileSigner(b"short")


# ---- the store -----------------------------------------------------------------------

def test_the_store_keeps_a_file_until_its_expiry_then_sweeps_it(tmp_path: Path) -> None:
    clock = Clock()
    store = FileStore(tmp_path, 1024, clock)
    stored = store.put("acme", b"hello", "text/plain", "a.txt", 60)
    meta, data = store.read("acme", stored.file_id)
    assert (data, meta.content_type, meta.name, meta.size) == (b"hello", "text/plain",
                                                                "a.txt", 5)
    # The same output again is the same file, kept longer.
    clock.now += 30
    again = store.put("acme", b"hello", "text/plain", "a.txt", 60)
    assert again.file_id == stored.file_id and again.expires == clock.now + 60
    assert store.used_bytes("acme") == 5
    # Another tenant does not see it.
    with pytest.raises(NotFound):
        store.read("other", stored.file_id)
    assert store.sweep() == 0
    clock.now += 60
    with pytest.raises(NotFound, match="no longer stored"):
        store.read("acme", stored.file_id)
    assert store.sweep() == 1
    assert store.used_bytes("acme") == 0
    assert not list((tmp_path / "acme").rglob("*.json"))


def test_the_store_refuses_past_the_tenants_quota(tmp_path: Path) -> None:
    store = FileStore(tmp_path, 10, Clock())
    store.put("acme", b"x" * 8, "application/octet-stream", "a", 60)
    with pytest.raises(QuotaExceeded, match="files_max_bytes"):
        store.put("acme", b"y" * 3, "application/octet-stream", "b", 60)
    store.put("other", b"y" * 3, "application/octet-stream", "b", 60)  # its own quota
    with pytest.raises(NotFound):
        store.read("acme", "../../etc")


# ---- multipart -----------------------------------------------------------------------

BOUNDARY = "b0und"
FORM = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: tuple[str, str | None, bytes]) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else "")
        out += (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
                + ("Content-Type: image/png\r\n" if filename else "") + "\r\n").encode()
        out += data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def test_a_form_is_parsed_into_fields_and_files() -> None:
    parts = parse_form(FORM, form(("n", None, b"3"), ("img", "cat.png", b"\x89PNG\r\n")),
                       max_parts=4)
    assert [(p.name, p.filename, bytes(p.data), p.is_file) for p in parts] == [
        ("n", None, b"3", False), ("img", "cat.png", b"\x89PNG\r\n", True)]
    assert parts[1].content_type == "image/png"


def test_the_form_parser_holds_its_limits() -> None:
    many = form(*[(f"f{i}", None, b"x") for i in range(5)])
    with pytest.raises(InvalidArgument, match="more than 4 parts"):
        parse_form(FORM, many, max_parts=4)
    body = form(("img", "a.png", b"data"))
    for broken in (body[:len(body) // 2], b"not a form", body.replace(b"form-data;", b"x;")):
        with pytest.raises(InvalidArgument) as refused:
            parse_form(FORM, broken, max_parts=4)
        assert refused.value.field == "body"
    with pytest.raises(InvalidArgument, match="boundary"):
        parse_form("multipart/form-data", body, max_parts=4)


SCHEMA = json.dumps({"type": "object", "properties": {
    "img": {"type": "string", "format": "uri"},
    "more": {"type": "array", "items": {"type": "string", "format": "uri"}},
    "n": {"type": "integer"}, "text": {"type": "string"},
    "opt": {"anyOf": [{"type": "string", "format": "uri"}, {"type": "null"}]}}})


def test_a_form_becomes_typed_inputs_with_files_as_data_uris() -> None:
    assert file_fields(SCHEMA) == {"img": False, "more": True, "opt": False}
    parts = parse_form(FORM, form(("img", "cat.png", b"\x00\x01"), ("n", None, b"3"),
                                  ("text", None, b"42"), ("more", "a.png", b"a"),
                                  ("more", "b.png", b"b")), max_parts=8)
    inputs = form_to_inputs(parts, SCHEMA)
    assert inputs["n"] == 3 and inputs["text"] == "42"
    assert parse_data_uri(inputs["img"]) == (b"\x00\x01", "image/png", "cat.png")
    assert [parse_data_uri(v)[0] for v in inputs["more"]] == [b"a", b"b"]
    with pytest.raises(InputRejected) as refused:
        form_to_inputs(parse_form(FORM, form(("n", "x.png", b"1")), 4), SCHEMA)
    assert refused.value.field == "n"
    with pytest.raises(InvalidArgument, match="twice"):
        form_to_inputs(parse_form(FORM, form(("n", None, b"1"), ("n", None, b"2")), 4),
                       SCHEMA)


# ---- file URLs as inputs, and the route ----------------------------------------------

@pytest.fixture()
def files(tmp_path: Path) -> Files:
    clock = Clock()
    return Files(FileStore(tmp_path, 1 << 20, clock), FileSigner(KEY, clock), 60.0, 8)


@pytest.fixture()
async def client(files: Files) -> AsyncIterator[TestClient[Any, Any]]:
    app = web.Application(middlewares=[_errors])
    app[FILES_KEY] = files
    app.router.add_get("/files/{token}", get_file)
    app.router.add_post("/resolve/{tenant}", _resolve)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except ThawError as exc:
        return error_response(exc)
    return response


async def _resolve(request: web.Request) -> web.Response:
    try:
        body = await resolve_inputs(request, request.match_info["tenant"], SCHEMA,
                                    await request.read(), 1000)
    except InputRejected as exc:
        return web.json_response({"field": exc.field, "message": exc.message}, status=422)
    return web.Response(body=body)


def _url(files: Files, tenant: str, data: bytes, name: str = "out.txt") -> str:
    stored = files.store.put(tenant, data, "text/plain", name, files.ttl)
    return "http://fn.example/files/" + files.signer.sign(tenant, stored.file_id,
                                                          int(stored.expires))


async def test_the_file_route_answers_a_signed_url_until_it_expires(
        client: TestClient[Any, Any], files: Files) -> None:
    url = _url(files, "acme", b"bytes out", "r\u00e9sum\u00e9.txt")
    path = url.removeprefix("http://fn.example")
    got = await client.get(path)
    assert got.status == 200 and await got.read() == b"bytes out"
    assert got.headers["Content-Type"].startswith("text/plain")
    assert got.headers["Content-Disposition"] == (
        "attachment; filename*=UTF-8''r%C3%A9sum%C3%A9.txt")
    forged = await client.get(path[:-3] + "AAA")
    assert forged.status == 403, await forged.text()
    error = (await forged.json())["error"]
    assert (error["code"], error["field"]) == ("permission_denied", "token")
    # Another tenant's file named by a validly signed token: not stored for it.
    stored = files.store.put("acme", b"z", "text/plain", "z", 60)
    other = files.signer.sign("other", stored.file_id, int(stored.expires))
    assert (await client.get(f"/files/{other}")).status == 404
    assert isinstance(files.signer.clock, Clock)
    files.signer.clock.now += 61
    expired = await client.get(path)
    assert expired.status == 403 and "expired" in (await expired.json())["error"]["message"]


async def test_a_signed_url_as_an_input_travels_as_its_bytes_for_its_tenant_only(
        client: TestClient[Any, Any], files: Files) -> None:
    url = _url(files, "acme", b"in bytes")
    ok = await client.post("/resolve/acme", data=json.dumps({"img": url, "n": 1}))
    inputs = json.loads(await ok.read())
    assert inputs["n"] == 1 and parse_data_uri(inputs["img"])[0] == b"in bytes"
    listed = await client.post("/resolve/acme", data=json.dumps({"more": [url, url]}))
    assert [parse_data_uri(v)[0] for v in json.loads(await listed.read())["more"]] == [
        b"in bytes", b"in bytes"]

    other = await client.post("/resolve/other", data=json.dumps({"img": url}))
    assert other.status == 422
    assert (await other.json())["field"] == "img"
    assert "another tenant" in (await other.json())["message"]
    elsewhere = await client.post("/resolve/acme", data=json.dumps(
        {"img": "https://example.com/cat.png"}))
    assert elsewhere.status == 422 and "not fetched" in (await elsewhere.json())["message"]
    path = await client.post("/resolve/acme", data=json.dumps({"img": "/etc/passwd"}))
    assert path.status == 422 and (await path.json())["field"] == "img"
    lookalike = await client.post("/resolve/acme", data=json.dumps(
        {"img": "https://example.com/files/cat.png"}))
    assert lookalike.status == 422
    assert "not issued by this platform" in (await lookalike.json())["message"]
    big = _url(files, "acme", b"x" * 2000)
    too_big = await client.post("/resolve/acme", data=json.dumps({"img": big}))
    assert too_big.status == 413, await too_big.text()
    # A data: URI, and an input that takes no file, go on as they are.
    given = json.dumps({"img": data_uri(b"x", "text/plain", None), "text": url}).encode()
    same = await client.post("/resolve/acme", data=given)
    assert await same.read() == given


# ---- the runtime's side --------------------------------------------------------------

class Handler:
    def predict(self, doc: pathlib.Path, extra: list[cog.Path] | None = None,
                raw: cog.File | None = None, n: int = 1) -> Any:
        assert isinstance(doc, pathlib.Path) and doc.is_file()
        assert all(isinstance(p, cog.Path) for p in extra or [])
        out = doc.parent / "out.bin"
        out.write_bytes(doc.read_bytes() * n + (raw.read() if raw else b""))
        self.seen = [doc, *(extra or [])]
        if n == 0:
            return {"files": [out, cog.Path(out)], "count": 2}
        return out


def test_a_file_parameter_is_a_uri_in_the_schema_as_cog_writes_it() -> None:
    schema = signature_schema(Handler().predict)
    assert schema is not None
    assert schema["properties"]["doc"] == {"type": "string", "format": "uri"}
    assert schema["properties"]["extra"]["anyOf"][0] == {
        "type": "array", "items": {"type": "string", "format": "uri"}}
    assert schema["required"] == ["doc"]


def _call(invoker: Invoker, inputs: dict[str, Any]) -> Payload:
    reply = invoker.invoke(Request("POST", "", "", {}, json.dumps(inputs).encode()))
    assert isinstance(reply, Payload)
    return reply


def test_the_handler_gets_real_paths_and_its_returned_path_is_sent_as_a_file() -> None:
    handler = Handler()
    invoker = Invoker(handler)
    reply = _call(invoker, {"doc": data_uri(b"ab", "text/plain", "../../etc/x.txt"),
                            "extra": ["data:,plain"], "raw": "data:;base64,Wlo=", "n": 2})
    assert reply.content_type == FILES_CONTENT_TYPE
    marker = json.loads(reply.body)[FILE_MARKER]
    assert base64.b64decode(marker["data"]) == b"ababZZ"
    assert marker["name"] == "out.bin"
    doc, extra = handler.seen
    assert doc.name == "x.txt" and str(doc).startswith("/tmp/")  # no folders from names
    assert not doc.exists() and not extra.exists()  # removed once the answer was made
    nested = json.loads(_call(invoker, {"doc": "data:,a", "n": 0}).body)
    assert nested["count"] == 2 and all(FILE_MARKER in f for f in nested["files"])


def test_a_file_input_that_is_no_data_uri_is_the_callers_bad_input() -> None:
    invoker = Invoker(Handler())
    for wrong in ("/etc/passwd", "data:;base64,@@@", 3):
        with pytest.raises(InvalidInput, match="'doc'"):
            _call(invoker, {"doc": wrong})
    with pytest.raises(FileInputError):
        materialise({"x": "http://a/b"}, {"x": ("path", pathlib.Path)})
    # Plain JSON answers stay plain JSON.
    class Plain:
        def predict(self, n: int) -> list[int]:
            return [n]
    assert _call(Invoker(Plain()), {"n": 1}).content_type == "application/json"


async def test_an_answer_with_files_gets_a_signed_url_per_file(files: Files) -> None:
    marker = {FILE_MARKER: {"name": "a.txt", "type": "text/plain",
                            "data": base64.b64encode(b"one").decode()}}
    body = json.dumps({"first": marker, "all": [marker, 3], "n": {"x": 1}}).encode()
    value = await publish_value(files, "https://fn.example", "acme", body)
    assert value["n"] == {"x": 1} and value["all"][1] == 3
    assert value["first"] == value["all"][0]  # the same file is stored once
    token = value["first"].removeprefix("https://fn.example/files/")
    signed = files.signer.verify(token)
    assert signed.tenant == "acme"
    assert files.store.read("acme", signed.file_id)[1] == b"one"
    broken = json.dumps({FILE_MARKER: {"name": "b", "data": "@@"}}).encode()
    with pytest.raises(ThawError, match="base64"):
        await publish_value(files, "https://fn.example", "acme", broken)


class _Upstream:
    def __init__(self, length: int) -> None:
        self.content_length = length
        self.headers = {"Content-Type": FILES_CONTENT_TYPE}


class _Exchange:
    """The parts of dispatch.Exchange that file_answer reads."""

    def __init__(self, body: bytes, length: int | None = None) -> None:
        self.upstream = _Upstream(len(body) if length is None else length)
        self.body = body
        self.reads = 0

    async def read(self) -> bytes:
        self.reads += 1
        return self.body


async def test_an_answer_too_large_for_the_quota_is_refused_unread(
        files: Files, tmp_path: Path) -> None:
    app = web.Application()
    app[FILES_KEY] = Files(FileStore(tmp_path / "small", 1000, Clock()), files.signer,
                           60.0, 8)
    request = make_mocked_request("POST", "/fn/acme/f", app=app)
    huge = _Exchange(b"", length=10 * 1024 * 1024)
    with pytest.raises(QuotaExceeded, match="files_max_bytes"):
        await file_answer(request, "acme", cast(Exchange, huge))
    assert huge.reads == 0
