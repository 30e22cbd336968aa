"""Environments on the docker runtime without an engine: the container of a launch in a
function's environment mounts and puts on PYTHONPATH that environment's site-packages
instead of the node's, refuses an image whose Python is another minor version, and a
restore is checked against the image's Python; `thaw up`'s line for a failed example."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.unit.test_launch_spec import LAYOUT, SETTINGS, FakeClient, fresh
from thaw.core.errors import InstanceFailed
from thaw.ops.services import _failed_example
from thaw.platform.docker import DockerRuntime
from thaw.platform.docker.spec import container_kwargs
from thaw.platform.environments_launch import environment_fingerprint
from thaw.platform.runtime import PythonEnv

SITE = "/home/agent/local/envs/abc/lib/python3.11/site-packages"
ENV = PythonEnv(key="abc" * 8, python="/home/agent/local/envs/abc/bin/python",
                paths=("/home/agent/local/envs/abc",), runtime_path="/rt",
                version="3.11.7", site_packages=SITE)


def test_a_container_in_an_environment_gets_its_site_packages_not_the_nodes() -> None:
    kwargs = container_kwargs(replace(fresh(), python_env=ENV), SETTINGS, LAYOUT)
    assert kwargs["environment"]["PYTHONPATH"].split(":") == ["/opt/thaw", SITE]
    mounts = {m["Target"]: (m["Source"], m["ReadOnly"]) for m in kwargs["mounts"]}
    assert mounts[SITE] == (SITE, True)
    assert "/venv/site-packages" not in mounts
    # Without an environment: the node's packages, as before.
    base = container_kwargs(fresh(), SETTINGS, LAYOUT)
    assert base["environment"]["PYTHONPATH"].split(":") == ["/opt/thaw", "/venv/site-packages"]
    # An image function's packages are its image's, environment or not.
    image = replace(fresh(), python_env=ENV, image="repo:tag@sha256:" + "1" * 64)
    assert container_kwargs(image, SETTINGS, LAYOUT)["environment"]["PYTHONPATH"] == (
        "/opt/thaw")


def test_the_docker_runtime_runs_environments_on_the_images_python(tmp_path: Path) -> None:
    docker = DockerRuntime(FakeClient(), image="thaw/base:test", node_id="n1",
                           state_dir=tmp_path)
    assert docker.capabilities.python_environments
    assert docker.capabilities.environments_on_own_python
    assert callable(docker.run_tool)
    docker.python_version = "3.11.2"
    docker._check_environment(replace(fresh(), python_env=ENV))  # same minor: runs
    docker.python_version = "3.12.1"
    with pytest.raises(InstanceFailed, match=r"is for Python 3\.11; .* has Python 3\.12"):
        docker._check_environment(replace(fresh(), python_env=ENV))
    docker._check_environment(fresh())  # the base environment: nothing to check


def test_a_restore_on_the_images_python_is_checked_against_it() -> None:
    local = {"python": "3.11.2", "torch": "", "numpy": "", "device_type": "host"}

    class Env:
        python = "3.11.7"
        lock = "attrs==0.0.1 \\\n    --hash=sha256:aa\n"

    assert environment_fingerprint(local, Env(), own_python=True)[  # type: ignore[arg-type]
        "python"] == "3.11.2"
    assert environment_fingerprint(local, Env())["python"] == "3.11.7"  # type: ignore[arg-type]


def test_a_failed_example_is_one_clear_line(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    line = _failed_example("echo", plain, "setup() raised\n  ValueError: x")
    assert line == "  echo     not deployed: its build failed: setup() raised ValueError: x"
    withdeps = tmp_path / "withdeps"
    withdeps.mkdir()
    (withdeps / "requirements.txt").write_text("humanize==4.16.0\n")
    line = _failed_example("withdeps", withdeps, "resolving the environment failed: "
                           "× No solution found\n  ╰─▶ humanize was not found " + "x" * 500)
    first, hint = line.split("\n")
    assert first.startswith("  withdeps not deployed: its build failed: resolving the "
                            "environment failed: × No solution found ╰─▶ humanize was")
    assert first.endswith("…") and len(first) < 480
    assert "package index" in hint and "docs/environments.md" in hint


def test_a_container_gets_the_folders_the_platform_provides_after_its_environment() -> None:
    provided = "/home/agent/local/envs/.provided-1234"
    spec = replace(fresh(), python_env=replace(ENV, provided=(provided,)))
    kwargs = container_kwargs(spec, SETTINGS, LAYOUT)
    # After the environment's own packages: its pins win over anything provided.
    assert kwargs["environment"]["PYTHONPATH"].split(":") == ["/opt/thaw", SITE, provided]
    mounts = {m["Target"]: (m["Source"], m["ReadOnly"]) for m in kwargs["mounts"]}
    assert mounts[provided] == (provided, True)


def test_a_container_gets_the_thaw_packages_own_file_beside_the_runtime() -> None:
    from thaw.platform.docker.spec import PUBLIC_NAMES_MOUNT
    from thaw.platform.runtime import public_names_file

    mounts = {m["Target"]: (m["Source"], m["ReadOnly"])
              for m in container_kwargs(fresh(), SETTINGS, LAYOUT)["mounts"]}
    assert mounts[PUBLIC_NAMES_MOUNT] == (public_names_file(), True)
    assert PUBLIC_NAMES_MOUNT == "/opt/thaw/thaw/__init__.py"
