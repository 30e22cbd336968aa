"""Warm instances of one snapshot fork from its restored template (a process that
restored the snapshot once): the second instance restores nothing, yet every instance
has its own on_restore, environment, id and log; killing the restored template leaves
its instances serving and later starts restore from the template as before; it
outlives the snapshot's last instance for a while (a cold start then only forks), then
ends."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FIXTURES, RunningPlatform, running
from thaw.bench.platform import service_environment
from thaw.ops.services import LocalPlatform
from thaw.snapshotter.runtime.restored_template import RESTORED_TEMPLATE_COMM

NAME = "restored-fork"
# Long enough for every call of a round to be in flight at once (each holds an
# instance, max_concurrency = 1), so a round of N calls brings N instances up.
HOLD_SECONDS = 2.0
SCALE_TO_ZERO_WAIT = 120.0
LINGER_SETTING = "THAW_RESTORED_TEMPLATE_IDLE_SECONDS"


def _round(platform: RunningPlatform, name: str, calls: int) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(calls) as pool:
        answers = list(pool.map(lambda _: platform.invoke(name, {"hold": HOLD_SECONDS}),
                                range(calls)))
    for answer in answers:
        assert answer.status_code == 200, answer.text
    return answers


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _stages(answer: httpx.Response) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r"(\w+);dur=([\d.]+)", answer.headers["Server-Timing"])}


def _instance_log(platform: RunningPlatform, instance: str) -> str:
    logs = platform.platform.home / "agent" / "local" / "logs"
    return next(logs.glob(f"*/{instance}.log")).read_text()


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while _comm(pid) == RESTORED_TEMPLATE_COMM:
        assert time.monotonic() < deadline, f"restored template {pid} still runs"
        time.sleep(0.1)


def test_second_instance_forks_from_the_restored_template(platform: RunningPlatform
                                                          ) -> None:
    assert platform.deploy(FIXTURES / "restored_fork").status_code == 201
    answers = _round(platform, NAME, 2)
    bodies: list[dict[str, Any]] = [a.json() for a in answers]
    instances = {a.headers["X-Thaw-Instance"] for a in answers}
    assert len(instances) == 2
    # Both instances' state was unpickled once, in one other process: the restored
    # template, a sibling of theirs (the template adopted them).
    restored_template = bodies[0]["unpickled_in"]
    assert {b["unpickled_in"] for b in bodies} == {restored_template}
    assert restored_template not in {b["pid"] for b in bodies}
    assert _comm(restored_template) == RESTORED_TEMPLATE_COMM
    assert bodies[0]["ppid"] == bodies[1]["ppid"] == _parent(restored_template)
    # What is each instance's own ran in each: on_restore once, the function's [env].
    for body in bodies:
        assert body["restores"] == 1 and body["restored_in"] == body["pid"]
        assert body["greeting"] == "hello"
    # Each start names its fork (both waited for the restored template's start: their
    # `restore`); one more instance finds it running and restores nothing.
    assert all("fork" in _stages(a) for a in answers)
    more = [a for a in _round(platform, NAME, 3)
            if a.headers["X-Thaw-Instance"] not in instances]
    assert len(more) == 1
    assert more[0].json()["unpickled_in"] == restored_template
    assert _stages(more[0])["restore"] == 0.0 and "fork" in _stages(more[0])
    # Each instance logs to its own log.
    for answer, body in zip(answers, bodies, strict=True):
        text = _instance_log(platform, answer.headers["X-Thaw-Instance"])
        assert f"on_restore in {body['pid']}" in text
        others = {b["pid"] for b in bodies} - {body["pid"]}
        assert not any(f"on_restore in {pid}" in text for pid in others)

    # Killed, it takes no instance with it; the next instance restores on its own.
    instances.add(more[0].headers["X-Thaw-Instance"])
    os.kill(restored_template, signal.SIGKILL)
    _wait_gone(restored_template)
    again = _round(platform, NAME, 3)
    assert {a.headers["X-Thaw-Instance"] for a in again} == instances
    fourth = [a for a in _round(platform, NAME, 4)
              if a.headers["X-Thaw-Instance"] not in instances]
    assert len(fourth) == 1
    body = fourth[0].json()
    assert body["unpickled_in"] == body["pid"] and body["restores"] == 1
    assert "fork" not in _stages(fourth[0])


def _scaled_to_zero(platform: RunningPlatform, name: str) -> None:
    deadline = time.monotonic() + SCALE_TO_ZERO_WAIT
    while platform.http.get(f"/v1/functions/{name}").json()["warm_instances"]:
        assert time.monotonic() < deadline, "did not scale to zero"
        time.sleep(0.5)


def _brief(tmp_path: Path, name: str) -> Path:
    bundle = tmp_path / name
    shutil.copytree(FIXTURES / "restored_fork", bundle)
    toml = bundle / "thaw.toml"
    toml.write_text(toml.read_text()
                    .replace(f'name = "{NAME}"', f'name = "{name}"')
                    .replace('scaledown_window = "3600s"', 'scaledown_window = "2s"'))
    return bundle


def test_it_outlives_the_last_instance_and_the_next_cold_start_forks_from_it(
        platform: RunningPlatform, tmp_path: Path) -> None:
    assert platform.deploy(_brief(tmp_path, "restored-fork-brief")).status_code == 201
    answers = _round(platform, "restored-fork-brief", 2)
    restored_template = answers[0].json()["unpickled_in"]
    assert _comm(restored_template) == RESTORED_TEMPLATE_COMM
    _scaled_to_zero(platform, "restored-fork-brief")
    # It lingers (restored_template_idle_seconds, 60 s by default): the next call finds
    # no instance, and its start is a fork that restores nothing.
    assert _comm(restored_template) == RESTORED_TEMPLATE_COMM
    cold = platform.invoke("restored-fork-brief", {"hold": 0})
    assert cold.status_code == 200, cold.text
    assert cold.headers["X-Thaw-Start"] == "restore"
    assert cold.json()["unpickled_in"] == restored_template
    assert _stages(cold)["restore"] == 0.0 and "fork" in _stages(cold)


@pytest.fixture(scope="module")
def brief_linger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    """A platform whose restored templates outlive their last instance by 1 s."""
    home = tmp_path_factory.mktemp("thaw-linger")
    with service_environment({LINGER_SETTING: "1"}), \
            running(LocalPlatform(home, gateway_port=0, host_devices="1x4GiB")) as platform:
        yield platform


def test_it_ends_once_it_has_outlived_the_last_instance(brief_linger: RunningPlatform,
                                                        tmp_path: Path) -> None:
    assert brief_linger.deploy(_brief(tmp_path, "restored-fork-end")).status_code == 201
    answers = _round(brief_linger, "restored-fork-end", 2)
    restored_template = answers[0].json()["unpickled_in"]
    assert _comm(restored_template) == RESTORED_TEMPLATE_COMM
    _scaled_to_zero(brief_linger, "restored-fork-end")
    _wait_gone(restored_template)
