"""An environment's install step measures how many of its packages are in
(platform/build_steps.py counting_installs), on a local index of hand-written wheels:
the build's step reaches "installing 1 packages ..." at 100% while uv still runs, and
a plain progress callable (a fresh start's) gets lines only."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.wheels import fake_attrs_index
from thaw.platform import build_steps
from thaw.platform.build_steps import NodeBuildSteps, StepLines, installed_count
from thaw.platform.environments import Dependencies, node_python
from thaw.platform.environments_build import Environments, EnvSettings
from thaw.platform.process import ProcessRuntime

KEY = ("dev", "fn", "1")


async def test_the_install_step_counts_the_packages_installed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_steps, "INSTALL_COUNT_SECONDS", 0.01)
    index = fake_attrs_index(tmp_path / "index")
    runtime = ProcessRuntime()  # unsandboxed: as the agent's user
    steps = NodeBuildSteps(min_interval=0.0)
    installed, go = asyncio.Event(), asyncio.Event()

    async def run_tool(tool):  # type: ignore[no-untyped-def]
        result = await runtime.run_tool(tool)
        if "install" in tool.argv[1:3]:
            # Installed, and uv not yet returned: the count is what shows.
            installed.set()
            await go.wait()
        return result

    envs = Environments(tmp_path / "envs", EnvSettings(index_url=str(index)),
                        run_tool)  # type: ignore[arg-type]
    lines: list[str] = []
    progress = StepLines(lines.append, steps.reporter(KEY))
    deps = Dependencies(("attrs==0.0.1",), node_python(), "requirements.txt")
    lock = await envs.resolve(deps, progress)
    building = asyncio.create_task(envs.ensure(lock, deps.python, progress))
    await installed.wait()
    for _ in range(500):
        step = steps.get(KEY)
        if step is not None and step.progress == 1.0:
            break
        await asyncio.sleep(0.01)
    step = steps.get(KEY)
    assert step is not None and step.text.startswith("installing 1 packages into environment")
    assert step.progress == 1.0
    go.set()
    env = await building
    assert installed_count(env.path) == 1
    step = steps.get(KEY)
    assert step is not None and " ready in " in step.text and step.progress is None
    # The count is the step's, never a log line.
    assert sum("installing" in line for line in lines) == 1
    assert not any("%" in line or "/1)" in line for line in lines)


def test_a_folder_without_packages_counts_none(tmp_path: Path) -> None:
    assert installed_count(tmp_path) == 0
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (site / "a-1.0.dist-info").mkdir()
    (site / "a").mkdir()
    (site / "b-2.0.dist-info").mkdir()
    assert installed_count(tmp_path) == 2
