"""The wheel is the whole product: `python -m build` makes it without a setuptools
warning about undeclared data, and installed into a fresh virtualenv outside the
checkout (no extras: no torch) it runs `thaw up`: the scheduler migrates its
database, the gateway serves the dashboard's assets, and the examples' files are
there (echo, and withdeps in its own environment, are deployed; the torch examples
are skipped by name, which they are only when their folders were found)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.e2e.test_up import up_output

# Building takes seconds; installing the dependencies (from pip's index and the
# machine's find-links, no torch) a minute or two; `thaw up` with echo under a minute.
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 600
UP_TIMEOUT = 240.0
# What never belongs in a copy of the source the wheel is built from.
NOT_SOURCE = (".venv", ".git", ".mypy_cache", ".hypothesis", ".pytest_cache", ".ruff_cache",
              "__pycache__", ".thaw", "build", "dist", "*.egg-info", "tests", "test-output",
              "*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")
# Lines of setuptools' warnings about package data (the ones the declaration avoids).
PACKAGING_WARNINGS = re.compile(
    r"absent from the `packages` configuration|Package would be ignored|"
    r"Installing '.*' as data is deprecated|SetuptoolsDeprecationWarning", re.I)


@pytest.fixture(scope="module")
def outside() -> Iterator[Path]:
    """A folder outside the checkout that a tenant's sandboxed instance can traverse
    (the wheel's virtualenv holds the interpreter instances run)."""
    folder = Path(tempfile.mkdtemp(prefix="thaw-wheel-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(outside: Path) -> Path:
    src = outside / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_SOURCE), symlinks=True)
    # No isolation: the build requirements (setuptools, wheel, grpcio-tools) are the
    # dev environment's, so nothing is downloaded to build.
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
         str(outside / "dist"), str(src)],
        cwd=src, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    warnings = [line for line in (built.stdout + built.stderr).splitlines()
                if PACKAGING_WARNINGS.search(line)]
    assert not warnings, "\n".join(warnings)
    found = list((outside / "dist").glob("thaw-*.whl"))
    assert len(found) == 1, found
    return found[0]


def test_the_wheel_carries_what_the_code_reads_at_run_time(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("thaw/scheduler/migrations/env.py", "thaw/scheduler/migrations/script.py.mako",
                   "thaw/scheduler/migrations/versions/0001_initial_schema.py",
                   "thaw/gateway/static/index.html", "thaw/gateway/static/dashboard.js",
                   "thaw/gateway/static/vendor/uPlot.iife.min.js",
                   "thaw/ops/doctor_bundles/weights/thaw.toml",
                   "thaw/examples/echo/thaw.toml", "thaw/examples/echo/app.py",
                   "thaw/examples/embed/thaw.toml", "thaw/examples/tinylm/app.py",
                   "thaw/examples/withdeps/requirements.txt",
                   "thaw/snapshotter/runtime/__init__.py", "thaw/platform/sandbox/launcher.py",
                   "thaw/proto/scheduler_pb2.py", "thaw/proto/scheduler.proto"):
        assert needed in names, needed
    migrations = {n for n in names if n.startswith("thaw/scheduler/migrations/versions/")}
    assert migrations == {f"thaw/scheduler/migrations/versions/{p.name}" for p in
                          (REPO / "scheduler" / "migrations" / "versions").glob("*.py")}
    assert not any(n.startswith(("tests/", "thaw/tests/")) for n in names)


def _head_revision() -> str:
    """The checkout's newest migration: the one no other names as its down_revision."""
    revisions, downs = set(), set()
    for path in (REPO / "scheduler" / "migrations" / "versions").glob("*.py"):
        text = path.read_text()
        found = re.search(r'^revision[^=]*=\s*["\'](\w+)', text, re.M)
        assert found, path
        revisions.add(found.group(1))
        downs.update(re.findall(r'^down_revision[^=]*=\s*["\'](\w+)', text, re.M))
    (head,) = revisions - downs
    return head


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("THAW_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"THAW_HOME": str(home), "HOME": str(home.parent),
                "THAW_CONFIG_FILE": str(home.parent / "absent.toml")})
    return env


def test_thaw_up_runs_from_the_wheel_in_a_fresh_virtualenv(outside: Path, wheel: Path) -> None:
    venv = outside / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Without extras: torch (the examples extra) is never downloaded. pip's own
    # configuration (index, find-links, cache) is the machine's.
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)],
                               capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    where = subprocess.run([str(python), "-c", "import thaw.ops; print(thaw.ops.__file__)"],
                           cwd=outside, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # not the checkout's

    home = outside / "home"
    proc = subprocess.Popen([str(venv / "bin" / "thaw"), "up", "--port", "0"], cwd=outside,
                            env=_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out = up_output(proc, UP_TIMEOUT)
        dashboard = re.search(r"dashboard\s+(http://127\.0\.0\.1:\d+)/", out)
        key = re.search(r"API key\s+(thaw_\S+)", out)
        echo = re.search(r"echo\s+(http://\S+/fn/dev/echo)\s+\[ready, restore starts\]", out)
        assert dashboard and key and echo, out
        # Found next to the package (else "not found next to the package"), skipped
        # only for want of torch.
        assert "not found next to the package" not in out, out
        for name in ("embed", "tinylm"):
            assert f"examples/{name} skipped: needs torch" in out, out
        # The database was made by the packaged migrations, up to the newest one.
        with sqlite3.connect(home / "scheduler" / "thaw.db") as db:
            (migrated,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
        assert migrated == _head_revision()

        headers = {"Authorization": f"Bearer {key.group(1)}"}
        resp = httpx.post(echo.group(1), json={"hi": 1}, headers=headers, timeout=60)
        assert resp.status_code == 200 and resp.json()["echo"] == {"hi": 1}, resp.text
        assert resp.headers["X-Thaw-Start"] == "restore"
        page = httpx.get(dashboard.group(1) + "/", timeout=10)
        assert page.status_code == 200 and "/static/dashboard.js" in page.text
        for asset in ("dashboard.js", "dashboard.css", "uPlot.iife.min.js", "uPlot.min.css"):
            got = httpx.get(f"{dashboard.group(1)}/static/{asset}", timeout=10)
            assert got.status_code == 200 and len(got.content) > 100, asset
        fns = httpx.get(dashboard.group(1) + "/v1/functions", headers=headers, timeout=10)
        assert [f["name"] for f in fns.json()["functions"]] == ["echo", "withdeps"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, out
