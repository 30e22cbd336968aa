"""Per-function Python environments end to end (docs/environments.md), on a local index
of hand-written wheels (no network): a function pinning its own `attrs` (a package
the platform itself uses) deploys, builds its environment, restores from its snapshot
on ANOTHER node (which rebuilds the environment from the lock in the snapshot) and
answers with its own version; a second function with the same lock reuses the
environment; another version of attrs lives beside it; a function without a
dependency file keeps the node's base environment; a requirement the index lacks
fails the build with the resolver's message."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES as REPO_FIXTURES
from tests.conftest import RunningPlatform, running
from tests.wheels import fake_attrs_index
from thaw.ops.services import LocalPlatform

HEARTBEAT_WAIT = 20.0
HANDLER = '''import sys

import attrs


class Pinned:
    def setup(self):
        self.version = attrs.__version__

    def __call__(self, request):
        return {"version": self.version, "now": attrs.__version__, "file": attrs.__file__,
                "prefix": sys.prefix}
'''


def function(folder: Path, name: str, requirements: str | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "thaw.toml").write_text(f'name = "{name}"\nhandler = "app:Pinned"\n')
    (folder / "app.py").write_text(HANDLER)
    if requirements is not None:
        (folder / "requirements.txt").write_text(requirements)
    return folder


def nodes(p: RunningPlatform) -> dict[str, dict[str, object]]:
    return {n["id"]: n for n in p.http.get("/v1/nodes").json()["nodes"]}


def wait_for(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + HEARTBEAT_WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def log_lines(p: RunningPlatform, name: str) -> list[str]:
    reply = p.http.get(f"/v1/functions/{name}/logs", params={"tail": "1000"})
    assert reply.status_code == 200, reply.text
    return [json.loads(line)["line"] for line in reply.text.splitlines() if line]


def environments(home: Path, node: str) -> list[Path]:
    root = home / "agent" / node / "envs"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) \
        if root.is_dir() else []


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    index = fake_attrs_index(tmp_path_factory.mktemp("index"))
    index.chmod(0o755)  # the builder's uid reads it (docs/environments.md)
    home = tmp_path_factory.mktemp("thaw-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THAW_ENV_INDEX_URL", str(index))
        local = LocalPlatform(home, gateway_port=0, host_devices="1x2GiB", agents=2)
        with running(local) as platform:
            wait_for(lambda: len(nodes(platform)) == 2, "two nodes")
            yield platform


def test_a_function_gets_its_own_attrs_and_restores_on_another_node(
        two_nodes: RunningPlatform, tmp_path: Path) -> None:
    p = two_nodes
    home = p.platform.home
    fn = p.deploy(function(tmp_path / "a", "pinned-attrs", "attrs==0.0.1\n")).json()
    assert fn["state"] == "ready" and fn["start_mode"] == "restore", fn
    lines = log_lines(p, "pinned-attrs")
    assert any("resolving 1 requirements from requirements.txt" in ln for ln in lines), lines
    assert any("installing 1 packages into environment" in ln for ln in lines), lines
    assert any(" ready in " in ln and "environment" in ln for ln in lines), lines
    builder = next(n for n in ("node0", "node1") if environments(home, n))
    other = "node1" if builder == "node0" else "node0"
    assert environments(home, other) == []

    # Restored where the environment was never built: the snapshot's lock rebuilds it.
    assert p.http.post(f"/v1/nodes/{builder}/cordon").json()["state"] == "cordoned"
    resp = p.invoke("pinned-attrs")
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Thaw-Start"] == "restore"
    assert resp.headers["X-Thaw-Node"] == other
    body = resp.json()
    assert body["version"] == "0.0.1" and body["now"] == "0.0.1", body
    built = environments(home, other)
    assert [e.name for e in built] == [e.name for e in environments(home, builder)]
    assert body["prefix"] == str(built[0]), body
    assert body["file"].startswith(str(built[0]) + "/"), body
    # Read-only and the agent's (this test's user): no tenant can change it.
    assert built[0].stat().st_uid == os.geteuid() and not built[0].stat().st_mode & 0o222
    assert p.http.post(f"/v1/nodes/{builder}/uncordon").json()["state"] == "ready"

    # The platform's own attrs is untouched, and a function without a dependency
    # file runs in the node's base environment, with the platform's attrs.
    base = p.deploy(function(tmp_path / "b", "base-attrs", None)).json()
    assert base["state"] == "ready", base
    answer = p.invoke("base-attrs").json()
    assert answer["version"] == importlib.metadata.version("attrs") != "0.0.1", answer
    assert "/envs/" not in answer["file"], answer


def test_the_same_lock_shares_one_environment_and_versions_live_side_by_side(
        two_nodes: RunningPlatform, tmp_path: Path) -> None:
    p = two_nodes
    home = p.platform.home
    assert p.deploy(function(tmp_path / "a", "twin-one", "attrs==0.0.1\n")).json()[
        "state"] == "ready"
    before = {n: environments(home, n) for n in ("node0", "node1")}
    fn = p.deploy(function(tmp_path / "b", "twin-two", "# the same pin\nattrs==0.0.1\n")).json()
    assert fn["state"] == "ready", fn
    lines = log_lines(p, "twin-two")
    assert any("cached" in ln and "environment" in ln for ln in lines), lines
    assert not any("installing" in ln for ln in lines), lines
    assert {n: environments(home, n) for n in ("node0", "node1")} == before
    assert p.invoke("twin-two").json()["version"] == "0.0.1"

    newer = p.deploy(function(tmp_path / "c", "newer-attrs", "attrs==0.0.2\n")).json()
    assert newer["state"] == "ready", newer
    assert p.invoke("newer-attrs").json()["version"] == "0.0.2"
    assert p.invoke("twin-one").json()["version"] == "0.0.1"


def test_a_requirement_the_index_lacks_fails_the_build_with_the_resolvers_message(
        two_nodes: RunningPlatform, tmp_path: Path) -> None:
    p = two_nodes
    fn = p.deploy(function(tmp_path / "a", "missing-dep", "nosuchpkg==1.0\n")).json()
    assert fn["state"] == "failed", fn
    assert "resolving the environment failed" in fn["reason"], fn
    assert "nosuchpkg" in fn["reason"], fn  # uv's own words name the package


def test_env_ls_lists_and_env_gc_removes_only_unused_environments(
        two_nodes: RunningPlatform, tmp_path: Path) -> None:
    p = two_nodes
    keep = p.deploy(function(tmp_path / "k", "gc-keep", "attrs==0.0.1\n")).json()
    drop = p.deploy(function(tmp_path / "d", "gc-drop", "attrs==0.0.2\nthawtiny\n")).json()
    assert keep["state"] == drop["state"] == "ready", (keep, drop)
    assert p.invoke("gc-drop").status_code == 200

    def listed() -> dict[str, dict[str, object]]:
        reply = p.http.get("/v1/nodes/environments")
        assert reply.status_code == 200, reply.text
        return {f"{n['node']}/{e['key']}": e for n in reply.json()["nodes"]
                for e in n["environments"]}

    envs = listed()
    dropped = {k for k, e in envs.items() if "dev/gc-drop" in e["functions"]}  # type: ignore[operator]
    kept = {k for k, e in envs.items() if "dev/gc-keep" in e["functions"]}  # type: ignore[operator]
    assert dropped and kept and not dropped & kept
    assert all(envs[k]["packages"] == 2 and envs[k]["size_bytes"] > 0 for k in dropped)

    # While gc-drop's instance lives, its environment is in use and stays.
    reply = p.http.post("/v1/nodes/environments/gc").json()
    assert not any(k.split("/")[1] in n["removed"] for n in reply["nodes"] for k in dropped)
    # An environment nothing uses (say, left by an earlier run of the agent) goes.
    home = p.platform.home
    node, key = next(iter(dropped)).split("/")
    orphan = home / "agent" / node / "envs" / ("f" * 32)
    shutil.copytree(home / "agent" / node / "envs" / key, orphan, symlinks=True)
    assert f"{node}/{'f' * 32}" in listed()
    reply = p.http.post("/v1/nodes/environments/gc", params={"node": node}).json()
    [answer] = reply["nodes"]
    assert answer["removed"] == ["f" * 32] and answer["freed_bytes"] > 0, reply
    assert not orphan.exists()
    # Once gc-drop is deleted, its environment goes with its snapshot.
    assert p.http.delete("/v1/functions/gc-drop").status_code in (200, 204)
    wait_for(lambda: not any(e["in_use"] for k, e in listed().items() if k in dropped),
             "gc-drop's instance to stop")
    reply = p.http.post("/v1/nodes/environments/gc").json()
    removed = {f"{n['node']}/{key}" for n in reply["nodes"] for key in n["removed"]}
    assert not kept & removed, reply
    after = listed()
    assert not dropped & set(after) and kept <= set(after)
    assert p.invoke("gc-keep").json()["version"] == "0.0.1"


def test_the_env_commands_print_each_nodes_environments(two_nodes: RunningPlatform,
                                                        tmp_path: Path) -> None:
    import subprocess

    p = two_nodes
    assert p.deploy(function(tmp_path / "a", "cli-env", "attrs==0.0.1\n")).json()[
        "state"] == "ready"
    env = {**os.environ, "THAW_URL": p.url, "THAW_API_KEY": p.key, "HOME": str(tmp_path)}

    def thaw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "thaw.ops", *args], env=env, text=True,
                              capture_output=True, timeout=300, check=False)

    listed = thaw("env", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    nodes = json.loads(listed.stdout)["nodes"]
    assert any("dev/cli-env" in e["functions"] for n in nodes for e in n["environments"])
    table = thaw("env", "ls")
    assert table.returncode == 0 and "dev/cli-env" in table.stdout, table
    collected = thaw("env", "gc")
    assert collected.returncode == 0, collected.stderr
    assert all(re.match(r"node\d: removed .* kept$", line)
               for line in collected.stdout.splitlines()), collected.stdout


@pytest.mark.parametrize("kind", ["pyproject.toml", "cog.yaml"])
def test_pyproject_and_cog_dependencies_build_the_same_way(
        two_nodes: RunningPlatform, tmp_path: Path, kind: str) -> None:
    p = two_nodes
    name = f"deps-{kind.split('.')[0]}"
    folder = function(tmp_path / "a", name, None)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if kind == "pyproject.toml":
        (folder / kind).write_text('[project]\nname = "m"\nversion = "1"\n'
                                   f'requires-python = ">={python}"\n'
                                   'dependencies = ["attrs==0.0.2", "thawtiny==1.0"]\n')
    else:
        (folder / kind).write_text(f'build:\n  python_version: "{python}"\n'
                                   '  python_packages:\n    - "attrs==0.0.2"\n'
                                   '    - "thawtiny>=1"\n')
    fn = p.deploy(folder).json()
    assert fn["state"] == "ready", fn
    assert any(f"requirements from {kind}" in line for line in log_lines(p, name))
    assert p.invoke(name).json()["version"] == "0.0.2"


def public_names_in_an_environment(folder: Path) -> Path:
    """The public-names fixture with a dependency file: it runs in its own environment,
    whose runtime copy carries the `thaw` package's names too."""
    shutil.copytree(REPO_FIXTURES / "public_names_rt", folder,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "requirements.txt").write_text("attrs==0.0.1\n")
    return folder


def check_public_names(p: RunningPlatform) -> None:
    assert p.invoke("public-names", {"word": "hi"}).json() == {"word": "hi"}
    bad = p.invoke("public-names", {"word": "bad"})
    assert bad.status_code == 422 and bad.json()["error"]["message"] == "not that word", (
        bad.text)
    assert p.invoke("public-names", {"word": "x", "status": 418}).status_code == 418


def test_from_thaw_import_works_in_a_functions_own_environment(
        two_nodes: RunningPlatform, tmp_path: Path) -> None:
    fn = two_nodes.deploy(public_names_in_an_environment(tmp_path / "pn")).json()
    assert fn["state"] == "ready" and fn["start_mode"] == "restore", fn
    # Built here or found cached (another test of this platform pins the same attrs).
    assert any("environment" in line and ("ready in" in line or "cached" in line)
               for line in log_lines(two_nodes, "public-names"))
    check_public_names(two_nodes)
