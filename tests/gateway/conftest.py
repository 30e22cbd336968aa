"""Gateway tests run against the real platform (the session's `platform` fixture).

Settings that differ from the platform's gateway (small rate limits, queue bounds,
breaker thresholds, JSON logs) get a gateway *replica*: another `thaw gateway`
process on port 0 talking to the same scheduler, as a second replica would in a
cluster. Its limits are its own (they are per replica by design).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import tomllib

from tests.conftest import RunningPlatform

BUNDLES = Path(__file__).resolve().parent / "bundles"
# Bounds a replica's start; it is up in well under a second.
REPLICA_START_SECONDS = 30.0


class Replica:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, key: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log
        self.http = httpx.Client(base_url=url, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"})

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def scheduler_address(platform: RunningPlatform) -> str:
    gateway = next(proc for name, proc in platform.platform.procs if name == "gateway")
    return psutil.Process(gateway.pid).environ()["THAW_SCHEDULER_ADDRESS"]


def start_replica(platform: RunningPlatform, tmp: Path, env: dict[str, str]) -> Replica:
    port_file = tmp / "replica-port"
    log = tmp / "replica.log"
    full_env = {**os.environ, "THAW_HOME": str(platform.platform.home),
                "THAW_SCHEDULER_ADDRESS": scheduler_address(platform),
                "THAW_GATEWAY_PORT": "0", **env}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "thaw.ops", "gateway",
                                 "--port-file", str(port_file)], env=full_env, stderr=out,
                                start_new_session=True)
    deadline = time.monotonic() + REPLICA_START_SECONDS
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"gateway replica did not start: {log.read_text()}")
        time.sleep(0.05)
    return Replica(proc, f"http://127.0.0.1:{port_file.read_text().strip()}",
                   platform.key, log)


@pytest.fixture
def replica(platform: RunningPlatform, tmp_path: Path
            ) -> Iterator[Callable[[dict[str, str]], Replica]]:
    started: list[Replica] = []

    def start(env: dict[str, str]) -> Replica:
        folder = tmp_path / f"replica{len(started)}"
        folder.mkdir()
        started.append(start_replica(platform, folder, env))
        return started[-1]

    yield start
    for r in started:
        r.stop()


_deployed: set[str] = set()


def deploy_once(platform: RunningPlatform, folder: Path) -> str:
    """Deploy a bundle the first time a test needs it; returns the function's name."""
    name = str(tomllib.loads((folder / "thaw.toml").read_text())["name"])
    if name not in _deployed:
        resp = platform.deploy(folder)
        assert resp.status_code == 201 and resp.json()["state"] == "ready", resp.text
        _deployed.add(name)
    return name


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str | None, object]]:
    event: str | None = None
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: "):])
            event = None


def wait_for_file(path: Path, seconds: float = 20.0) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


ASYNC = {"Prefer": "respond-async"}
# Bounds every wait for a stored invocation to finish; they finish in well under a second.
FINISH_SECONDS = 60.0


def wait_done(http: httpx.Client, invocation_id: str) -> dict[str, Any]:
    """The invocation once it is no longer queued or running."""
    deadline = time.monotonic() + FINISH_SECONDS
    while True:
        resp = http.get(f"/v1/invocations/{invocation_id}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        if body["status"] not in ("queued", "running"):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
