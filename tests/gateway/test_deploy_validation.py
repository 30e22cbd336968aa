"""Deploys that break thaw.toml's schema or a bundle's limits, against the real
platform: each answered 400 or 413 with the key or member at fault, none a 500 or a
dropped connection; the schema itself is served at /v1/schema/thaw.toml."""

from __future__ import annotations

import gzip
import io
import tarfile
import time

import httpx

from tests.conftest import RunningPlatform
from thaw.core.spec import thaw_toml_schema

# Agents heartbeat every 2 s; a loaded machine may delay the first.
HEARTBEAT_WAIT_SECONDS = 30.0
APP = b"class H:\n    def __call__(self, request):\n        return request\n"


def _bundle(toml: bytes | None, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("thaw.toml", toml), ("app.py", APP)):
            if data is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return buf.getvalue()


def _deploy(platform: RunningPlatform, data: bytes) -> httpx.Response:
    return platform.http.post("/v1/functions", content=data,
                              headers={"Content-Type": "application/gzip"})


def _error(resp: httpx.Response, status: int) -> dict[str, str]:
    assert resp.status_code == status, resp.text
    error: dict[str, str] = resp.json()["error"]
    return error


def test_the_schema_is_served_to_anyone(platform: RunningPlatform) -> None:
    resp = httpx.get(f"{platform.url}/v1/schema/thaw.toml")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/schema+json")
    assert resp.json() == thaw_toml_schema()


def test_bad_thaw_toml_values_are_400_with_the_key(platform: RunningPlatform) -> None:
    head = 'handler = "app:H"\n'
    cases = [
        ('name = "trailing\\n"\n' + head, "name"),
        ('name = "many"\n' + head + "[scaling]\nmin_instances = 1000\nmax_instances = 1000\n",
         "scaling.min_instances"),
        ('name = "nan-timeout"\n' + head + "[scaling]\ntimeout = nan\n", "scaling.timeout"),
        ('name = "inf-window"\n' + head + "[scaling]\nscaledown_window = inf\n",
         "scaling.scaledown_window"),
        ('name = "huge-gpu"\n' + head + '[resources]\ngpu_memory = "1000TiB"\n',
         "resources.gpu_memory"),
        # Within the schema, past the largest device of this platform's node.
        ('name = "big-gpu"\n' + head + '[resources]\ngpu_memory = "512GiB"\n',
         "resources.gpu_memory"),
    ]
    for toml, field in cases:
        error = _error(_deploy(platform, _bundle(toml.encode())), 400)
        assert error["field"] == field, error
        assert field in error["message"], error
    for toml, _field in cases:
        name = toml.split('"')[1]
        if "\\" not in name:
            assert platform.http.get(f"/v1/functions/{name}").status_code == 404


def test_memory_past_the_largest_node_is_400(platform: RunningPlatform) -> None:
    # The node's memory comes with its heartbeats: wait for one to have arrived.
    deadline = time.monotonic() + HEARTBEAT_WAIT_SECONDS
    while not any(n["telemetry"]["memory_total_bytes"] > 0
                  for n in platform.http.get("/v1/nodes").json()["nodes"]):
        assert time.monotonic() < deadline, "no heartbeat with the node's memory"
        time.sleep(0.2)
    toml = b'name = "big-mem"\nhandler = "app:H"\n[resources]\nmemory = "32TiB"\n'
    error = _error(_deploy(platform, _bundle(toml)), 400)
    assert error["field"] == "resources.memory" and "largest node" in error["message"]


def test_bad_bundles_are_400_or_413_naming_the_limit(platform: RunningPlatform) -> None:
    as_dir = tarfile.TarInfo("thaw.toml")
    as_dir.type = tarfile.DIRTYPE
    error = _error(_deploy(platform, _bundle(None, [as_dir])), 400)
    assert error["field"] == "thaw.toml" and "folder" in error["message"]

    sparse = tarfile.TarInfo("hole")
    sparse.pax_headers = {"GNU.sparse.size": str(2 * 1024**3), "GNU.sparse.map": "0,0"}
    ok_toml = b'name = "sparse"\nhandler = "app:H"\n'
    error = _error(_deploy(platform, _bundle(ok_toml, [sparse])), 400)
    assert error["field"] == "bundle/hole" and "sparse" in error["message"]

    link = tarfile.TarInfo("passwd")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
    error = _error(_deploy(platform, _bundle(ok_toml, [link])), 400)
    assert error["field"] == "bundle/passwd"

    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    error = _error(_deploy(platform, _bundle(ok_toml, [fifo])), 400)
    assert error["field"] == "bundle/pipe"

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, size in (("thaw.toml", 0), ("zeros", 256 * 1024 * 1024)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    bomb = gzip.compress(raw.getvalue(), compresslevel=9)
    error = _error(_deploy(platform, bomb), 413)
    assert error["code"] == "bundle_too_large" and "ratio" in error["message"]
