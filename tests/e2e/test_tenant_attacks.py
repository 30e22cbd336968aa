"""A second tenant's function attacks the node and the first tenant on a running
platform with its defaults (the process runtime's sandbox, mutual TLS inside): it tries
to read the data directory, the development key, the platform's CA key, the other
tenant's bundle and chunks; to list, read, signal, trace and read the memory of the
other tenant's instance; to write the other tenant's snapshot; to connect to the other
tenant's socket and to every port the platform listens on; to become root. Every
attempt is refused, and the victim keeps answering with the state its setup() made."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FIXTURES, RunningPlatform, bundle
from thaw.platform.sandbox.plan import python_paths

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0, reason="kernel sandboxes need root")]

# What a refused attempt may meet: nothing there (its root does not hold the path),
# not allowed, a read-only file system, no route or nobody listening in its own
# network namespace.
REFUSED = {"ENOENT", "EPERM", "EACCES", "EROFS", "ECONNREFUSED", "ENETUNREACH", "ESRCH"}


def listening_ports() -> set[int]:
    """Every TCP port something on this host listens on (the platform's among them)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def deploy_as(url: str, key: str, folder: Path) -> dict[str, Any]:
    made = httpx.post(f"{url}/v1/functions", params={"wait": "true"}, content=bundle(folder),
                      headers={"Content-Type": "application/gzip",
                               "Authorization": f"Bearer {key}"}, timeout=600)
    assert made.status_code == 201, made.text
    fn: dict[str, Any] = made.json()
    assert fn["state"] == "ready", fn
    return fn


def test_a_tenant_cannot_touch_another_tenant_or_the_platform(
        platform: RunningPlatform) -> None:
    home = platform.platform.home
    http = platform.http
    assert http.post("/v1/tenants", json={"id": "mallory"}).status_code in (201, 409)
    made = http.post("/v1/keys", json={"tenant": "mallory", "scopes": ["admin"],
                                       "name": "attacker"})
    assert made.status_code == 201, made.text
    mallory = made.json()["key"]

    victim_fn = deploy_as(platform.url, platform.key, FIXTURES / "victim")
    attacker_fn = deploy_as(platform.url, mallory, FIXTURES / "attacker")

    def victim() -> dict[str, Any]:
        answer = httpx.post(victim_fn["url"], json={"n": 1}, timeout=60,
                            headers={"Authorization": f"Bearer {platform.key}"})
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        assert body["secret"] == "victim-state-7f3a" and body["echo"] == {"n": 1}
        return body

    before = victim()
    victim_pid = before["pid"]
    assert before["uid"] >= 200000  # a tenant uid, not root

    secrets = [home / "dev-key", home / "pki" / "ca.key", home / "pki" / "agent.key",
               *home.rglob("thaw.db")]
    victim_bundles = [p for p in home.rglob("app.py")
                      if "victim-state-7f3a" in p.read_text(errors="replace")]
    # Chunk files at any depth of a chunk store (BLAKE3 ones sit under chunks/blake3/).
    chunks = [p for p in home.rglob("*")
              if p.is_file() and "chunks" in p.relative_to(home).parts[:-1]]
    assert secrets[0].exists() and victim_bundles and chunks
    victim_sockets = glob.glob(f"/dev/shm/thaw-*/run/{before['uid']}/*.sock")
    assert victim_sockets
    shm_snapshots = [p for p in glob.glob("/dev/shm/thaw-*/**", recursive=True)
                     if os.path.isfile(p)]
    ports = sorted(listening_ports())
    assert ports

    attack = {"victim_pid": victim_pid,
              "read": [str(p) for p in [*secrets, *victim_bundles, *chunks[:3]]]
              + ["/proc/1/environ", f"/proc/{os.getppid()}/environ"],
              "write": [str(p) for p in [*chunks[:3], *shm_snapshots[:5]]],
              "walk": [str(home), "/dev/shm", "/root", "/tmp"],
              "tcp": ports, "unix": victim_sockets}
    answer = httpx.post(attacker_fn["url"], json=attack, timeout=120,
                        headers={"Authorization": f"Bearer {mallory}"})
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    print(json.dumps(found, indent=1))  # every attempt and what it met, for the record

    attempts = {k: v for k, v in found.items()
                if k not in ("pids", "self", "uid", "environment") and not k.startswith("walk")}
    worked = {k: v for k, v in attempts.items() if not (isinstance(v, str) and v in REFUSED)}
    assert worked == {}, worked
    # Of the data directory, /dev/shm, /root and /tmp it sees only its own bundle, its
    # own area and the read-only Python environment (the folders leading to them are
    # empty there).
    own_bundle = next(p.parent for p in home.rglob("app.py")
                      if "class Attacker" in p.read_text(errors="replace"))
    seen = [path for key, paths in found.items() if key.startswith("walk") for path in paths]
    assert seen, found
    # The read-only Python environment: the interpreter's prefixes and the thaw
    # runtime package (outside them in an editable install), as the sandbox binds them.
    python = tuple(p + "/" for p in python_paths(sys.executable))
    for path in seen:
        assert (path.startswith((str(own_bundle) + "/", *python))
                or f"/{found['uid']}/" in path), path
    assert found["uid"] not in (0, before["uid"]) and found["uid"] >= 200000
    assert victim_pid not in found["pids"]
    # It sees only processes of its own uid, which no other tenant on this machine has.
    for pid in found["pids"]:
        with contextlib.suppress(FileNotFoundError):
            assert os.stat(f"/proc/{pid}").st_uid == found["uid"], pid
    assert not any(name.startswith("THAW_SCHEDULER") or name.startswith("THAW_HOME")
                   for name in found["environment"])
    assert found["mem"] == "ENOENT" and found["kill"] in ("EPERM", "ESRCH")

    after = victim()
    assert after["pid"] == victim_pid  # never killed or replaced
