"""DESIGN.md §1: one namespace; platform/ must never shadow the stdlib's platform."""

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_platform_folder_has_no_init() -> None:
    assert not (REPO / "platform" / "__init__.py").exists()


def test_import_platform_from_repo_root_is_the_stdlib() -> None:
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(out).resolve().parent == stdlib


def test_each_folder_is_a_thaw_subpackage() -> None:
    import thaw.blobstore
    import thaw.gateway
    import thaw.ops
    import thaw.platform.devices
    import thaw.scheduler
    import thaw.snapshotter

    assert Path(thaw.platform.devices.__file__).parent == REPO / "platform"
    for module, folder in ((thaw.gateway, "gateway"), (thaw.scheduler, "scheduler"),
                           (thaw.blobstore, "blobstore"), (thaw.ops, "ops"),
                           (thaw.snapshotter, "snapshotter")):
        assert Path(module.__file__).parent == REPO / folder
    # Nothing is installed as a bare top-level name of another PyPI package.
    out = subprocess.run([sys.executable, "-c", "import gateway"], cwd="/",
                         capture_output=True, text=True)
    assert out.returncode != 0
