"""The packages the platform provides to a cog.yaml environment: only names its lock
does not pin, none when it pins cog, a folder that imports cog on its own
(platform/environments_provided.py, docs/environments.md)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from thaw.platform.environments_provided import ensure_folder, folder_name, provided


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
