"""A stored result's output files (gateway/stored/result_files.py): stored once for
the result's lifetime, recorded as references, and read back as URLs signed at each
read that expire files_url_ttl_seconds after it, never after the file; an outcome
whose files cannot be kept fails (gateway/stored/outcome.py keep_files)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

from thaw.gateway.files import Files
from thaw.gateway.filestore import FileSigner, FileStore, FileUrlRefused
from thaw.gateway.stored.outcome import Outcome, keep_files
from thaw.gateway.stored.result_files import FILE_REFS_TYPE, Links, is_refs, store_files
from thaw.snapshotter.runtime.files import FILE_MARKER, FILES_CONTENT_TYPE

TTL = 60.0
KEEP = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _files(tmp_path: Path, clock: Clock, max_bytes: int = 1 << 20) -> Files:
    return Files(FileStore(tmp_path, max_bytes, clock=clock),
                 FileSigner(b"k" * 32, clock=clock), TTL, 8)


def _answer(data: bytes) -> bytes:
    marker = {FILE_MARKER: {"name": "out.txt", "type": "text/plain",
                            "data": base64.b64encode(data).decode()}}
    return json.dumps({"n": 1, "file": marker, "more": [marker]}).encode()


def test_a_result_is_stored_once_and_its_urls_are_minted_per_read(tmp_path: Path) -> None:
    clock = Clock()
    files = _files(tmp_path, clock)
    refs = store_files(files, "dev", _answer(b"bytes"), KEEP)
    assert b"bytes" not in refs and base64.b64encode(b"bytes") not in refs
    links = Links(files, "http://fn.example")
    first = links.value("dev", refs)
    assert first["n"] == 1 and first["file"] == first["more"][0]
    url = first["file"]
    assert url.startswith("http://fn.example/files/")
    signed = files.signer.verify(url.rsplit("/", 1)[1])
    assert (signed.tenant, signed.expires) == ("dev", int(clock.now + TTL))
    meta, data = files.store.read("dev", signed.file_id)
    assert data == b"bytes" and meta.expires == clock.now + KEEP

    # Past the first URL's expiry (the file is kept): a new read, a new working URL.
    clock.now += TTL + 1
    try:
        files.signer.verify(url.rsplit("/", 1)[1])
        raise AssertionError("the first URL should have expired")
    except FileUrlRefused:
        pass
    again = links.value("dev", refs)["file"]
    assert again != url
    assert files.signer.verify(again.rsplit("/", 1)[1]).file_id == signed.file_id
    assert files.store.read("dev", signed.file_id)[1] == b"bytes"

    # Near the result's end a URL expires with the file, not after it.
    clock.now = meta.expires - 5
    last = files.signer.verify(links.value("dev", refs)["file"].rsplit("/", 1)[1])
    assert last.expires == int(meta.expires)


def test_keep_files_records_refs_and_fails_a_result_it_cannot_keep(tmp_path: Path) -> None:
    clock = Clock()
    answer = Outcome(True, 200, FILES_CONTENT_TYPE, _answer(b"x" * 100), start="fresh")
    kept = asyncio.run(keep_files(_files(tmp_path / "a", clock), "dev", answer, KEEP))
    assert kept.succeeded and is_refs(kept.content_type)
    assert kept.content_type == FILE_REFS_TYPE and kept.start == "fresh"

    # Not a files answer, or a failed one: as it is.
    plain = Outcome(True, 200, "application/json", b"{}")
    assert asyncio.run(keep_files(_files(tmp_path / "b", clock), "dev", plain, KEEP)) is plain
    failed = Outcome(False, 500, FILES_CONTENT_TYPE, _answer(b"y"))
    assert asyncio.run(keep_files(_files(tmp_path / "c", clock), "dev", failed, KEEP)) is failed

    # Past the tenant's quota: the invocation fails with quota_exceeded (429).
    full = asyncio.run(keep_files(_files(tmp_path / "d", clock, max_bytes=10), "dev",
                                  answer, KEEP))
    assert not full.succeeded and full.status == 429
    assert full.error_code == "quota_exceeded"
    broken = Outcome(True, 200, FILES_CONTENT_TYPE, b'{"file": ')
    bad = asyncio.run(keep_files(_files(tmp_path / "e", clock), "dev", broken, KEEP))
    assert not bad.succeeded and "not valid JSON" in bad.error_message
