"""The packages the platform provides to a cog.yaml environment: only names its lock
does not pin, none when it pins cog, a folder that imports cog on its own
(platform/environments_provided.py, docs/environments.md)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

from thaw.platform.environments_build import Environment
from thaw.platform.environments_launch import LaunchEnvironments
from thaw.platform.environments_provided import (
    ensure_folder,
    folder_for,
    folder_name,
    provided,
)
from thaw.platform.runtime import PythonEnv, RuntimeCapabilities


def _names(source: str, pins: dict[str, str]) -> set[str]:
    return {d.metadata["Name"].lower() for d in provided(source, pins)}


def test_only_what_the_lock_does_not_pin() -> None:
    everything = _names("cog.yaml", {})
    assert {"cog", "coglet", "requests"} <= everything
    assert "requests" not in _names("cog.yaml", {"requests": "2.0", "attrs": "1"})
    assert _names("cog.yaml", {"cog": "0.23.1"}) == set()
    assert _names("requirements.txt", {}) == set()
    assert _names("pyproject.toml", {}) == set()


def test_the_folder_imports_cog_alone_and_is_read_only(tmp_path: Path) -> None:
    dists = provided("cog.yaml", {})
    folder = ensure_folder(tmp_path, dists)
    assert folder.name == folder_name(dists) and folder.parent == tmp_path
    assert ensure_folder(tmp_path, dists) == folder  # made once
    assert not folder.stat().st_mode & stat.S_IWUSR
    assert not (folder / "cog" / "__init__.py").stat().st_mode & 0o222
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging left
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import cog, requests; "
            "print(cog.__file__)")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(folder)],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith(str(folder))


class _Envs:
    """Enough of Environments for LaunchEnvironments: its root and python_env."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def python_env(self, env: Environment) -> PythonEnv:
        return PythonEnv(key=env.key, python=f"{env.path}/bin/python",
                         paths=(str(env.path), "/runtime"), runtime_path="/runtime")


def _env(key: str, source: str, lock: str, root: Path) -> Environment:
    return Environment(key=key, path=root / key, python="3.11.7", platform="x",
                       lock=lock, source=source, packages=1, size_bytes=1)


def test_a_launch_in_a_cog_environment_gets_the_folder_after_the_runtime(
        tmp_path: Path) -> None:
    launch = LaunchEnvironments(_Envs(tmp_path),  # type: ignore[arg-type]
                                RuntimeCapabilities(python_environments=True))
    cog = _env("a" * 32, "cog.yaml", "attrs==0.0.2 \\\n", tmp_path)
    pinned = _env("b" * 32, "cog.yaml", "cog==0.23.1 \\\n", tmp_path)
    plain = _env("c" * 32, "requirements.txt", "attrs==0.0.2 \\\n", tmp_path)
    for env in (cog, pinned, plain):
        asyncio.run(launch._provide(launch._required(), env))
    folder = launch.provided[cog.key]
    assert folder.startswith(str(tmp_path / ".provided-"))
    made = launch.python_env(cog)
    assert made is not None and made.runtime_path == f"/runtime{os.pathsep}{folder}"
    assert made.paths == (str(cog.path), "/runtime", folder)  # bound read-only
    for env in (pinned, plain):  # nothing provided: the launch is the environment's own
        assert launch.python_env(env) == _Envs(tmp_path).python_env(env)
    assert folder_for(tmp_path, "pyproject.toml", "") == ""
