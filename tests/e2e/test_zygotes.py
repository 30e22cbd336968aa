"""Templates of different code in one Python environment fork from one zygote, and
idle templates are stopped under the node's template memory budget and started again
by the next cold call (platform/zygotes.py, platform/template_eviction.py; thaw issue
20). Real services, real processes; the platform sandboxes where the tests run as root."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import FIXTURES, RunningPlatform, running
from thaw.ops.services import LocalPlatform

# Every idle template is over a one-byte budget; one second unused makes it idle enough.
SETTINGS = {"THAW_ZYGOTES": "on", "THAW_TEMPLATE_MEMORY_BUDGET": "1",
            "THAW_TEMPLATE_IDLE_SECONDS": "1"}
# Instances scale down after 2 s (the fixtures' thaw.toml); the agent checks templates'
# memory every 10 s: the eviction of both is seen well within this.
EVICTION_WAIT_SECONDS = 90.0


@pytest.fixture(scope="module")
def zygote_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    saved = {key: os.environ.get(key) for key in SETTINGS}
    os.environ.update(SETTINGS)
    try:
        home = tmp_path_factory.mktemp("thaw-zygotes")
        with running(LocalPlatform(home, gateway_port=0, host_devices="1x4GiB",
                                   log_dir=home / "service-logs")) as platform:
            yield platform
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _runtime_ancestors(pid: int) -> list[psutil.Process]:
    """The instance's ancestors that run the zygote's command line, nearest first: the
    template that forked it (forked from the zygote, so it keeps that command line),
    then the zygote itself."""
    return [p for p in psutil.Process(pid).parents()
            if "zygote" in p.cmdline() and "thaw.snapshotter.runtime" in " ".join(p.cmdline())]


def _agent_log(platform: RunningPlatform) -> str:
    folder = Path(platform.platform.home) / "service-logs"
    return "".join(path.read_text(errors="replace") for path in sorted(folder.glob("*.log")))


def test_two_functions_fork_their_templates_from_one_zygote_and_evicted_ones_return(
        zygote_platform: RunningPlatform) -> None:
    for name in ("zygote_a", "zygote_b"):
        deployed = zygote_platform.deploy(FIXTURES / name)
        assert deployed.status_code == 201, deployed.text

    lineages = {}
    for name in ("zygote-a", "zygote-b"):
        cold = zygote_platform.invoke(name)
        assert cold.status_code == 200, cold.text
        assert cold.headers["X-Thaw-Start"] == "restore"
        lineages[name] = _runtime_ancestors(cold.json()["pid"])

    a, b = lineages["zygote-a"], lineages["zygote-b"]
    assert len(a) >= 2 and len(b) >= 2, (a, b)
    # Two templates (different code), one zygote above both.
    assert a[0].pid != b[0].pid
    assert a[-1].pid == b[-1].pid
    old_template = a[0].pid

    # Idle (their instances scaled down), both templates are over the budget.
    deadline = time.monotonic() + EVICTION_WAIT_SECONDS
    while _agent_log(zygote_platform).count("template evicted") < 2:
        assert time.monotonic() < deadline, "no template was evicted:\n" + \
            _agent_log(zygote_platform)[-4000:]
        time.sleep(1.0)
    assert not psutil.pid_exists(old_template) or \
        psutil.Process(old_template).status() == psutil.STATUS_ZOMBIE

    again = zygote_platform.invoke("zygote-a")
    assert again.status_code == 200, again.text
    assert again.headers["X-Thaw-Start"] == "restore"
    assert "template" in again.headers["Server-Timing"]
    renewed = _runtime_ancestors(again.json()["pid"])
    assert len(renewed) >= 2 and renewed[0].pid != old_template


def test_a_function_setting_the_environment_at_import_gets_a_zygote_that_imported_so(
        zygote_platform: RunningPlatform) -> None:
    deployed = zygote_platform.deploy(FIXTURES / "import_env_rt")
    assert deployed.status_code == 201, deployed.text
    cold = zygote_platform.invoke("import-env-rt", {})
    assert cold.status_code == 200, cold.text
    assert cold.headers["X-Thaw-Start"] == "restore"
    assert cold.json()["setting"] == "on"
    assert len(_runtime_ancestors(cold.json()["pid"])) >= 2  # forked from a zygote
    log = _agent_log(zygote_platform)
    told = [line for line in log.splitlines()
            if "import sets environment variables" in line]
    assert told and "THAW_TEST_IMPORT_SETTING" in told[0], log[-4000:]
