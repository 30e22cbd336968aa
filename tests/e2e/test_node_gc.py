"""Garbage collection on a real platform: after a function is deleted, `thaw node gc`
removes its bundle, its instances' logs and the node's leftovers (an unpack folder,
build outputs of a build that died), keeps what a live function uses (it still
answers), and the bytes freed are in the event log."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import EXAMPLES, RunningPlatform, running
from thaw.ops.cli import cli
from thaw.ops.services import LocalPlatform

NODE = "local"


@pytest.fixture
def gc_platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> Iterator[RunningPlatform]:
    # Logs of ended instances go at the first collection; none runs on its own.
    monkeypatch.setenv("THAW_GC_LOG_AGE", "0")
    monkeypatch.setenv("THAW_GC_INTERVAL", "0")
    with running(LocalPlatform(tmp_path / "home", gateway_port=0,
                               host_devices="1x2GiB")) as platform:
        yield platform


def _write(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 65536)


def test_thaw_node_gc_collects_a_deleted_function_and_keeps_a_live_one(
        gc_platform: RunningPlatform, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    p = gc_platform
    doomed_src = tmp_path / "doomed"
    shutil.copytree(EXAMPLES / "echo", doomed_src)
    toml = doomed_src / "thaw.toml"
    toml.write_text(toml.read_text().replace('name = "echo"', 'name = "doomed"'))
    live = p.deploy(EXAMPLES / "echo").json()
    doomed = p.deploy(doomed_src).json()
    assert live["state"] == doomed["state"] == "ready", (live, doomed)
    assert live["bundle_digest"] != doomed["bundle_digest"]
    answers = {name: p.invoke(name, {"n": 1}) for name in ("echo", "doomed")}
    assert all(a.status_code == 200 for a in answers.values()), answers
    instance = {name: a.headers["X-Thaw-Instance"] for name, a in answers.items()}

    agent = p.platform.home / "agent" / NODE
    uid = json.loads((agent / "sandbox" / "uids.json").read_text())["dev"]
    logs = agent / "logs" / str(uid)
    bundles = agent / "bundles"
    for name, fn in (("echo", live), ("doomed", doomed)):
        assert (bundles / fn["bundle_digest"]).is_dir()
        assert (logs / f"{instance[name]}.log").is_file()
    # What crashes leave: a half-unpacked bundle and the outputs of a build that died.
    leftovers = [bundles / f".{'f' * 64}-dead0001", agent / "builds" / str(uid) /
                 "dev-ghost-1-abcdef", agent / "builds" / ".sealed" / "dev-ghost-1-fedcba"]
    for folder in leftovers:
        _write(folder / "part.bin")

    assert p.http.delete("/v1/functions/doomed").status_code in (200, 204)

    monkeypatch.setenv("THAW_URL", p.url)
    monkeypatch.setenv("THAW_API_KEY", p.key)
    monkeypatch.delenv("THAW_PROFILE", raising=False)
    result = CliRunner().invoke(cli, ["node", "gc", NODE, "--json"])
    assert result.exit_code == 0, result.output
    (collected,) = json.loads(result.output)["nodes"]
    assert collected["node"] == NODE and not collected["error"], collected
    freed = {f["kind"]: f for f in collected["freed"]}
    assert freed["bundles"]["items"] >= 1 and freed["bundles"]["bytes"] > 0
    assert freed["logs"]["items"] >= 1
    assert freed["staging"]["items"] == 1 and freed["builds"]["items"] == 2
    assert collected["freed_bytes"] >= sum(f["bytes"] for f in freed.values()) > 0

    assert not (bundles / doomed["bundle_digest"]).exists()
    assert not (logs / f"{instance['doomed']}.log").exists()
    assert not any(folder.exists() for folder in leftovers)
    assert (bundles / live["bundle_digest"]).is_dir()
    assert (logs / f"{instance['echo']}.log").is_file()
    again = p.invoke("echo", {"n": 2})
    assert again.status_code == 200, again.text

    events = p.http.get("/v1/events", params={"kind": "garbage_collected"}).json()["events"]
    assert events, "no garbage_collected event"
    event = events[-1]
    assert event["node_id"] == NODE
    assert int(event["attrs"]["freed_bytes"]) == collected["freed_bytes"]
    assert int(event["attrs"]["bundles_bytes"]) == freed["bundles"]["bytes"]

    # A second pass finds nothing more of the deleted function and the live one keeps
    # serving; a node that does not exist is a clear error.
    result = CliRunner().invoke(cli, ["node", "gc"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{NODE}: freed")
    assert (bundles / live["bundle_digest"]).is_dir()
    missing = CliRunner().invoke(cli, ["node", "gc", "no-such-node"])
    assert missing.exit_code != 0
    assert "404" in str(missing.exception) and "no-such-node" in str(missing.exception)
