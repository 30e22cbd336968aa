"""A secret on the real platform (sandboxed process runtime): it reaches the function's
environment on a fresh start, a build's setup() (also one forked from a running
template) and a restore, forked from a template or in a fresh interpreter (on_restore
sees it),
a new value drains the running instances so the next call and on_restore see it, and
the value is nowhere else: not in any file of the data directory (the DB, logs,
snapshots, blobstore, agent folders), not in the services' logs (debug level), not in
any API answer or audit entry, not in the events. The functions answer hashes of what
they see, never the value."""

from __future__ import annotations

import hashlib
import os
import secrets
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import lz4.block
import pytest
from click.testing import CliRunner

from tests.conftest import FIXTURES, RunningPlatform, bundle, running
from thaw.ops.cli import cli
from thaw.ops.services import LocalPlatform

pytestmark = pytest.mark.sandbox

APP = '''
import hashlib
import os

IMPORTED_IN = os.getpid()


def digest():
    value = os.environ.get("PROBE_TOKEN")
    return hashlib.sha256(value.encode()).hexdigest() if value is not None else None


class Probe:
    def setup(self):
        self.setup_digest = digest()
        self.setup_mode = os.environ.get("MODE")
        self.forked_for_setup = os.getpid() != IMPORTED_IN
        self.restored_digest = None

    def on_restore(self):
        self.restored_digest = digest()

    def __call__(self, request):
        return {"digest": digest(), "setup_digest": self.setup_digest,
                "setup_mode": self.setup_mode, "forked_for_setup": self.forked_for_setup,
                "restored_digest": self.restored_digest, "mode": os.environ.get("MODE"),
                "names": os.environ.get("THAW_SECRET_NAMES"), "pid": os.getpid()}
'''


def probe_bundle(tmp: Path, name: str, snapshot: bool, secret: str = "PROBE_TOKEN") -> Path:
    folder = tmp / name
    folder.mkdir()
    (folder / "app.py").write_text(APP)
    (folder / "thaw.toml").write_text(textwrap.dedent(f'''\
        name = "{name}"
        handler = "app:Probe"
        secrets = ["{secret}"]

        [env]
        MODE = "probe"

        [snapshot]
        enabled = {"true" if snapshot else "false"}

        [resources]
        gpu_memory = 0
        '''))
    return folder


def unforked_bundle(tmp: Path, name: str) -> Path:
    """probe_bundle whose module initialises (fake) CUDA at import: its template may
    not fork, so its restores run in fresh interpreters (restore mode)."""
    folder = probe_bundle(tmp, name, snapshot=True)
    (folder / "fake_gpu.py").write_bytes(
        (FIXTURES / "cuda_at_import" / "fake_gpu.py").read_bytes())
    (folder / "app.py").write_text("import fake_gpu\n\nHAS_GPU = bool(fake_gpu."
                                   "cupy_or_fake().cuda.is_available())\n" + APP)
    return folder


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class Seen:
    """Every answer body the test got from the API, to search for the value."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.bodies: list[bytes] = []

    def __call__(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        resp = self.http.request(method, path, **kwargs)  # type: ignore[arg-type]
        self.bodies.append(resp.content + str(resp.headers).encode())
        return resp


@pytest.fixture
def platform_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("THAW_LOG_LEVEL", "debug")
    yield tmp_path / "home"


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for here, _dirs, names in os.walk(root):
        for name in names:
            path = Path(here) / name
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if name.endswith(".lz4"):  # a compressed chunk of the disk tier: its bytes
                data = lz4.block.decompress(data)
            if any(n in data for n in needles):
                found.append(str(path.relative_to(root)))
    return found


def test_a_secret_reaches_its_function_and_nowhere_else(
        platform_home: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    first = "v1-" + secrets.token_urlsafe(24)
    second = "v2-" + secrets.token_urlsafe(24)
    with running(LocalPlatform(platform_home, gateway_port=0,
                               host_devices="1x1GiB")) as platform:
        api = Seen(platform.http)
        _check_the_secret_path(platform, api, tmp_path, first, second)
        audit = api("GET", "/v1/audit", params={"limit": 200})
        assert audit.status_code == 200, audit.text
        actions = [(e["action"], e["target"]) for e in audit.json()["entries"]]
        assert ("secret.set", "PROBE_TOKEN") in actions
        assert ("secret.delete", "UNUSED") in actions
        events = api("GET", "/v1/events", params={"limit": 1000})
        assert events.status_code == 200
        listed = api("GET", "/v1/secrets")
        assert [s["name"] for s in listed.json()["secrets"]] == ["PROBE_TOKEN"]
    logs = capfd.readouterr()
    needles = [v.encode() for v in (first, second)]
    for body in api.bodies:
        assert not any(n in body for n in needles), body[:300]
    assert not any(n in (logs.out + logs.err).encode() for n in needles)
    assert "secret set" in logs.out + logs.err  # the scheduler's log names, no value
    # Every file the platform wrote: the DB (and its WAL), the services' and the
    # instances' logs, snapshots, the blobstore, the agent's folders.
    assert files_holding(platform_home, needles) == []
    # The search reads what it must: the DB (names are kept in clear) and the snapshot's
    # chunks (setup() kept the value's hash on the handler: snapshotted).
    assert any("thaw.db" in f for f in files_holding(platform_home, [b"PROBE_TOKEN"]))
    in_snapshots = files_holding(platform_home, [sha(first).encode()])
    assert in_snapshots and all(f.startswith("agent/") for f in in_snapshots), in_snapshots
    assert (platform_home / "scheduler" / "secrets.key").stat().st_mode & 0o777 == 0o600


def command_lines_holding(needle: bytes) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if needle in argv or needle.hex().encode() in argv:
            found.append(pid)
    return found


def _check_the_secret_path(platform: RunningPlatform, api: Seen, tmp: Path, first: str,
                           second: str) -> None:
    restored = probe_bundle(tmp, "probe-restore", snapshot=True)
    fresh = probe_bundle(tmp, "probe-fresh", snapshot=False)
    unforked = unforked_bundle(tmp, "probe-unforked")

    def deploy(folder: Path) -> httpx.Response:
        return api("POST", "/v1/functions", params={"wait": "true"},
                   content=bundle(folder), headers={"Content-Type": "application/gzip"})

    def call(name: str) -> httpx.Response:
        resp = api("POST", f"/fn/dev/{name}", json={})
        assert resp.status_code == 200, resp.text
        return resp

    # Naming a secret the tenant lacks: refused at deploy, naming it.
    refused = deploy(restored)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["field"] == "secrets" and "PROBE_TOKEN" in error["message"]

    made = api("PUT", "/v1/secrets/PROBE_TOKEN", json={"value": first})
    assert made.status_code == 201, made.text
    assert set(made.json()) == {"name", "created_at", "updated_at", "version", "functions",
                                "drained"}
    assert made.headers["Cache-Control"] == "no-store"
    assert api("PUT", "/v1/secrets/UNUSED", json={"value": "x"}).status_code == 201

    for folder in (restored, fresh, unforked):
        resp = deploy(folder)
        assert resp.status_code == 201, resp.text

    fresh_answer = call("probe-fresh")
    assert fresh_answer.headers["X-Thaw-Start"] == "fresh"
    body = fresh_answer.json()
    assert (body["digest"], body["setup_digest"], body["mode"]) == (
        sha(first), sha(first), "probe")

    restore_answer = call("probe-restore")
    assert restore_answer.headers["X-Thaw-Start"] == "restore"
    body = restore_answer.json()
    # setup() ran in the build with the value; the restore got it before on_restore;
    # the list of names the build removed before its capture is not in the instance.
    assert (body["digest"], body["restored_digest"], body["setup_digest"]) == (
        sha(first), sha(first), sha(first))
    assert body["mode"] == "probe" and body["names"] is None
    old_pid = body["pid"]
    lone = call("probe-unforked")
    assert lone.headers["X-Thaw-Start"] == "restore"
    assert (lone.json()["digest"], lone.json()["restored_digest"]) == (sha(first),
                                                                       sha(first))
    log = api("GET", "/v1/functions/probe-unforked/logs", params={"tail": 1000}).text
    assert "restores in a fresh interpreter" in log
    # Both instances (and the template) are up: no command line on the machine holds
    # the value (the sandbox launcher's plan travels in argv).
    assert command_lines_holding(first.encode()) == []

    rotated = api("PUT", "/v1/secrets/PROBE_TOKEN", json={"value": second})
    assert rotated.status_code == 200, rotated.text
    doc = rotated.json()
    assert doc["version"] == 2 and sorted(doc["functions"]) == [
        "probe-fresh", "probe-restore", "probe-unforked"]
    assert body["forked_for_setup"] is False  # the first build imported the module
    assert doc["drained"] >= 3

    after = call("probe-restore")
    body = after.json()
    assert after.headers["X-Thaw-Start"] == "restore" and body["pid"] != old_pid
    assert (body["digest"], body["restored_digest"]) == (sha(second), sha(second))
    assert body["setup_digest"] == sha(first)  # setup() ran once, at the build
    again = call("probe-fresh").json()
    assert (again["digest"], again["setup_digest"]) == (sha(second), sha(second))
    lone = call("probe-unforked").json()
    assert (lone["digest"], lone["restored_digest"]) == (sha(second), sha(second))

    # A copy of running code builds in its template (setup() in a fork of it): the
    # build request carries [env] and the current value.
    copy = probe_bundle(tmp, "probe-copy", snapshot=True)
    assert deploy(copy).status_code == 201
    built = call("probe-copy").json()
    assert built["forked_for_setup"] is True and built["setup_mode"] == "probe"
    assert (built["setup_digest"], built["restored_digest"]) == (sha(second), sha(second))

    # Deleting a secret in use: 409 naming the functions; UNUSED goes.
    in_use = api("DELETE", "/v1/secrets/PROBE_TOKEN")
    assert in_use.status_code == 409, in_use.text
    assert in_use.json()["error"]["code"] == "secret_in_use"
    assert "probe-copy, probe-fresh, probe-restore, probe-unforked" in in_use.json()[
        "error"]["message"]
    assert api("DELETE", "/v1/secrets/UNUSED").status_code == 200
    assert api("DELETE", "/v1/secrets/UNUSED").status_code == 404

    # The CLI: a value from stdin or a file, never argv; ls shows no value.
    env = {"THAW_URL": platform.url, "THAW_API_KEY": platform.key}
    runner = CliRunner()
    result = runner.invoke(cli, ["secret", "set", "CLI_ONE"], input=first + "\n", env=env)
    assert result.exit_code == 0, result.output
    value_file = tmp / "value.txt"
    value_file.write_text(second)
    result = runner.invoke(cli, ["secret", "set", "CLI_ONE", "--from-file",
                                 str(value_file)], env=env)
    assert result.exit_code == 0 and "version 2" in result.output, result.output
    value_file.unlink()
    listing = runner.invoke(cli, ["secret", "ls"], env=env)
    assert listing.exit_code == 0 and "CLI_ONE" in listing.output
    assert first not in listing.output and second not in listing.output
    result = runner.invoke(cli, ["secret", "rm", "CLI_ONE"], env=env)
    assert result.exit_code == 0, result.output
