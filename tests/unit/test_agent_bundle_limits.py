"""The agent unpacks a bundle under the same streaming limits as the scheduler reads it
(core/bundle.py): a bundle it fetches that breaks them (a gzip bomb, a sparse file, a
link out) is refused before it fills the disk, and leaves no unpack folder behind; a
good one is unpacked and readable."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_cpu_only_on_cuda import CUDA_NODE, NoChunks, RecordingRuntime
from thaw.core.errors import InvalidBundle
from thaw.platform.agent import Agent
from thaw.platform.cuda.allocator import CudaDevices
from thaw.platform.cuda.fake import InMemoryCudaApi

MiB = 1024**2
TOML = b'name = "x"\nhandler = "app:X"\n'


def _tar(*members: tarfile.TarInfo, data: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for name, body in data.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for info in members:
            tar.addfile(info)
    return buf.getvalue()


def _agent(tmp_path: Path, bundles: dict[str, bytes]) -> Any:
    async def fetch(digest: str) -> bytes:
        return bundles[digest]

    devices = CudaDevices(InMemoryCudaApi([64 * MiB]), reserve_bytes=0,
                          instance_overhead_bytes=0, granularity=4096)
    return Agent(node_id="n1", home=tmp_path / "home", run_dir=tmp_path / "run",
                 devices=devices, runtime=RecordingRuntime(),  # type: ignore[arg-type]
                 snapshots=NoChunks(),  # type: ignore[arg-type]
                 fetch_bundle=fetch, start_timeout=5.0, fingerprint=dict(CUDA_NODE))


async def test_bad_bundles_are_refused_while_unpacking_and_leave_nothing(
        tmp_path: Path) -> None:
    sparse = tarfile.TarInfo("hole")
    sparse.pax_headers = {"GNU.sparse.size": str(2 * 1024**3), "GNU.sparse.map": "0,0"}
    link = tarfile.TarInfo("out")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    bundles = {
        "a" * 64: gzip.compress(_tar(data={"thaw.toml": TOML, "zeros": bytes(64 * MiB)},
                                     mode="w")),
        "b" * 64: _tar(sparse, data={"thaw.toml": TOML}),
        "c" * 64: _tar(link, data={"thaw.toml": TOML}),
        "d" * 64: _tar(data={"thaw.toml": TOML, "app.py": b"class X: pass\n"}),
    }
    agent = _agent(tmp_path, bundles)
    for digest, word in (("a" * 64, "ratio"), ("b" * 64, "sparse"), ("c" * 64, "inside")):
        with pytest.raises(InvalidBundle, match=word):
            await agent.ensure_bundle(digest)
    assert sorted(p.name for p in (tmp_path / "home" / "bundles").iterdir()) == []
    folder = await agent.ensure_bundle("d" * 64)
    assert (folder / "app.py").read_bytes() == b"class X: pass\n"
    assert (folder / "thaw.toml").stat().st_mode & 0o004  # readable by tenant uids
