"""`thaw bench env`: what a per-function Python environment costs, in one run on one
machine (docs/environments.md).

It starts a private local platform whose agents install from a local folder of wheels
it writes itself (PACKAGES pure-Python packages, no network; or `index`, any index the
operator names), then measures:
- the environment's build, cold (resolve + install, the agent's own "ready in" figure
  and the deploy's wall time) and cached (a second function with the same lock);
- deploys of the same function with and without its dependency file;
- restores (no warm instance: scaledown_window = 0s) of a function in its own
  environment vs the same function in the node's base environment, the first one
  (its template starts) and the later ones (forked from the template).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import statistics
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from thaw.bench.coldstart import _call, _stages, _wait_cold
from thaw.bench.platform import PlatformFactory
from thaw.core.spec import pack_bundle

# Packages of the bench's own index, and the lines of code in each (so installing
# writes something measurable).
PACKAGES = 20
LINES_PER_MODULE = 400
READY = re.compile(r"environment (\w+) ready in ([0-9.]+) s")
HANDLER = '''import importlib
import os


class Bench:
    def setup(self):
        pins = open("requirements.txt").read().split() if os.path.exists(
            "requirements.txt") else []
        # Imported in setup(): the snapshot's template imports them before a restore.
        self.values = [importlib.import_module(p.split("==")[0]).VALUE_1 for p in pins]

    def __call__(self, request):
        return {"modules": len(self.values)}
'''


def write_index(folder: Path, packages: int = PACKAGES) -> list[str]:
    """`packages` pure-Python wheels in `folder` (a flat index); their pins."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = []
    for i in range(packages):
        name, version = f"thawbench{i}", "1.0"
        body = "".join(f"VALUE_{n} = {n}\n" for n in range(LINES_PER_MODULE))
        _wheel(folder, name, version, {f"{name}/__init__.py": body})
        pins.append(f"{name}=={version}")
    folder.chmod(0o755)
    return pins


def _wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> None:
    dist = f"{name}-{version}"
    entries = dict(files)
    entries[f"{dist}.dist-info/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    entries[f"{dist}.dist-info/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: thaw-bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    record = []
    for path, text in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())
        record.append(f"{path},sha256={digest.rstrip(b'=').decode()},{len(text.encode())}")
    entries[f"{dist}.dist-info/RECORD"] = "\n".join([*record, f"{dist}.dist-info/RECORD,,"])
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as archive:
        for path, text in entries.items():
            archive.writestr(path, text)


def _bundle(folder: Path, name: str, requirements: list[str] | None) -> bytes:
    folder.mkdir(parents=True)
    (folder / "thaw.toml").write_text(
        f'name = "{name}"\nhandler = "app:Bench"\n[scaling]\nscaledown_window = "0s"\n')
    # Code of its own per function: each deploy builds its snapshot (no template of
    # the same code to fork), so only the environment is shared.
    (folder / "app.py").write_text(f"# {name}\n{HANDLER}")
    if requirements is not None:
        (folder / "requirements.txt").write_text("".join(f"{r}\n" for r in requirements))
    return pack_bundle(str(folder))


@contextlib.contextmanager
def _index_env(index: str) -> Iterator[None]:
    """The platform's agents read the index from THAW_ENV_INDEX_URL (set while it runs)."""
    before = os.environ.get("THAW_ENV_INDEX_URL")
    os.environ["THAW_ENV_INDEX_URL"] = index
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("THAW_ENV_INDEX_URL", None)
        else:
            os.environ["THAW_ENV_INDEX_URL"] = before


def _deploy(http: httpx.Client, data: bytes) -> float:
    started = time.perf_counter()
    resp = http.post("/v1/functions", params={"wait": "true"}, content=data)
    elapsed = time.perf_counter() - started
    resp.raise_for_status()
    if resp.json()["state"] != "ready":
        raise RuntimeError(f"deploy failed: {resp.json()}")
    return elapsed


def _log_lines(http: httpx.Client, name: str) -> list[str]:
    import json

    reply = http.get(f"/v1/functions/{name}/logs", params={"tail": "1000"})
    reply.raise_for_status()
    return [json.loads(line)["line"] for line in reply.text.splitlines() if line]


def _restores(http: httpx.Client, name: str, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        _wait_cold(http, name)
        elapsed, resp = _call(http, name, {})
        if resp.headers.get("X-Thaw-Start") != "restore":
            raise RuntimeError(f"expected a restore of {name}, got "
                               f"{resp.headers.get('X-Thaw-Start')}")
        samples.append(elapsed)
    return samples


def run_environment_bench(rounds: int = 5, index: str = "",
                          requirements: list[str] | None = None, *,
                          platform: PlatformFactory) -> dict[str, Any]:
    """The figures above as one JSON-able object. `index` and `requirements`: measure
    another index and requirement set than the bench's own."""
    with tempfile.TemporaryDirectory(prefix="thaw-bench-env-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        own_index = not index
        if own_index:
            requirements = write_index(root / "index")
            index = str(root / "index")
        pins = requirements or []
        with _index_env(index):
            local = platform(root / "home", "1x2GiB")
            local.start()
        try:
            http = httpx.Client(base_url=local.url, timeout=1800,
                                headers={"Authorization": f"Bearer {local.key}"})
            base_deploy = _deploy(http, _bundle(root / "b", "bench-env-base", None))
            cold_deploy = _deploy(http, _bundle(root / "e", "bench-env-own", pins))
            cached_deploy = _deploy(http, _bundle(root / "c", "bench-env-twin", pins))
            cold_lines = _log_lines(http, "bench-env-own")
            twin_lines = _log_lines(http, "bench-env-twin")
            ready = [READY.search(line) for line in cold_lines]
            build = next((float(m.group(2)) for m in ready if m), None)
            samples = {"base": _restores(http, "bench-env-base", rounds),
                       "own": _restores(http, "bench-env-own", rounds)}
            _wait_cold(http, "bench-env-own")
            _elapsed, last = _call(http, "bench-env-own", {})
            http.close()
        finally:
            local.stop()
    return {
        "packages": len(pins), "rounds": rounds,
        "index": "the bench's own local wheels" if own_index else index,
        "environment_build_cold_s": build,
        "environment_cached": any("cached" in line for line in twin_lines),
        "deploy_base_s": round(base_deploy, 4),
        "deploy_own_environment_cold_s": round(cold_deploy, 4),
        "deploy_own_environment_cached_s": round(cached_deploy, 4),
        "restore_first_base_s": round(samples["base"][0], 4),
        "restore_first_own_environment_s": round(samples["own"][0], 4),
        "restore_base_s": round(statistics.median(samples["base"][1:] or samples["base"]), 4),
        "restore_own_environment_s": round(
            statistics.median(samples["own"][1:] or samples["own"]), 4),
        "restore_samples_base_s": [round(x, 4) for x in samples["base"]],
        "restore_samples_own_environment_s": [round(x, 4) for x in samples["own"]],
        "last_server_timing_own_s": _stages(last.headers.get("Server-Timing", "")),
    }
