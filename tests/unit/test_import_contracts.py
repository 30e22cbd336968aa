"""The import contracts of .importlinter hold on this tree and bite on a back-import.

lint-imports reads the packages as `make lint` does: from a tree whose `thaw/` folder
holds each package folder (links to the real ones, or a copy where one is edited), so
every module is named thaw.<folder>.<...>. A copy gets the deliberate back-import; the
output must name both the broken contract and the edited module, which shows that the
copy, not the repository, was analysed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("core", "proto", "gateway", "scheduler", "platform", "snapshotter", "blobstore",
           "ops", "bench", "client")
LAYERS = "Layers: ops > bench > gateway"


def _tree(root: Path, edits: dict[str, str] | None = None) -> Path:
    """root/thaw/<folder> for every package: a link to the repository's folder, or a
    copy where `edits` ({"core/units.py": "import thaw.gateway"}) adds a line to a file."""
    edits = edits or {}
    edited = {path.split("/", 1)[0] for path in edits}
    (root / "thaw").mkdir(parents=True)
    for folder in FOLDERS:
        target = root / "thaw" / folder
        if folder in edited:
            shutil.copytree(REPO / folder, target,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.symlink_to(REPO / folder, target_is_directory=True)
    for path, line in edits.items():
        module = root / "thaw" / path
        text = module.read_text()
        # After the module's docstring and `from __future__` line: a plain import.
        anchor = "from __future__ import annotations\n"
        assert anchor in text, f"{path} has no `{anchor.strip()}` to add the import after"
        module.write_text(text.replace(anchor, f"{anchor}\n{line}\n", 1))
    return root


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "lint-imports"
    assert script.exists(), "lint-imports comes with the dev extras: pip install -e '.[dev]'"
    return subprocess.run(
        [str(script), "--no-logo", "--no-cache", str(REPO / ".importlinter")],
        cwd=tree, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint_imports(_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
    assert LAYERS in result.stdout and "No cycles in core KEPT" in result.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_layers(tmp_path: Path) -> None:
    result = _lint_imports(_tree(tmp_path, {"core/units.py": "import thaw.gateway.app"}))
    assert result.returncode == 1, result.stdout + result.stderr
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert LAYERS in broken
    assert "thaw.core is not allowed to import thaw.gateway" in broken
    assert "thaw.core.units -> thaw.gateway.app" in broken


def test_the_platform_importing_the_cli_breaks_the_layers(tmp_path: Path) -> None:
    result = _lint_imports(_tree(tmp_path, {"blobstore/disk.py": "import thaw.ops.client"}))
    assert result.returncode == 1, result.stdout + result.stderr
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert LAYERS in broken
    assert "thaw.blobstore.disk -> thaw.ops.client" in broken


def test_the_in_instance_runtime_importing_thaw_breaks_its_contract(tmp_path: Path) -> None:
    result = _lint_imports(_tree(
        tmp_path, {"snapshotter/runtime/handler.py": "import thaw.core.errors"}))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "The in-instance runtime imports no other part of thaw BROKEN" in result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert "thaw.snapshotter.runtime.handler -> thaw.core.errors" in broken


def test_a_cycle_inside_a_package_breaks_its_acyclic_contract(tmp_path: Path) -> None:
    # http1server imports http1messages; the way back closes a cycle.
    result = _lint_imports(_tree(
        tmp_path, {"core/http1messages.py": "import thaw.core.http1server"}))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "No cycles in core BROKEN" in result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert ".http1messages -> .http1server" in broken or \
        ".http1server -> .http1messages" in broken
    assert LAYERS not in broken  # a cycle inside core crosses no layer
