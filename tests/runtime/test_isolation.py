"""The runtime runs inside the tenant's environment, which may hold nothing but a Python
interpreter (DESIGN.md §3): it must import only the standard library, plus torch/NumPy
when the function itself uses them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import subprocess_env

# Every module of the runtime package (a new one is held to the rule as it lands).
RUNTIME_MODULES = sorted(path.stem for path in (
    Path(__file__).resolve().parents[2] / "snapshotter" / "runtime").glob("*.py")
    if path.stem != "__init__")

PROBE = """
import importlib, json, sys
before = set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module("thaw.snapshotter.runtime." + name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def top_level(name: str) -> str:
    return name.partition(".")[0]


@pytest.fixture(scope="module")
def added_modules() -> list[str]:
    """Every module that importing the whole runtime adds, in a clean interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *RUNTIME_MODULES],
        capture_output=True, text=True, check=True, env=subprocess_env(),
    ).stdout
    added: list[str] = json.loads(out)
    return added


def test_runtime_imports_only_the_standard_library(added_modules: list[str]) -> None:
    assert "thaw.snapshotter.runtime.template" in added_modules  # the probe imported it all
    foreign = [
        name for name in added_modules
        if top_level(name) not in sys.stdlib_module_names
        and top_level(name) not in ("thaw", "torch", "numpy")
    ]
    assert foreign == []
    # Nothing of thaw's other packages either (protobuf, grpc, aiohttp live behind them).
    ours = {"thaw", "thaw.snapshotter", "thaw.snapshotter.runtime"} | {
        f"thaw.snapshotter.runtime.{name}" for name in RUNTIME_MODULES}
    assert {name for name in added_modules if top_level(name) == "thaw"} <= ours


def test_runtime_does_not_import_torch_or_numpy_itself(added_modules: list[str]) -> None:
    # Importing torch costs seconds: a function that does not use it must not pay.
    assert [name for name in added_modules if top_level(name) in ("torch", "numpy")] == []
