"""Templates (zygotes): pre-import once, fork restored instances on request; every
restore runs on_restore() and gets its own random state (DESIGN.md §3, §4)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    Client,
    Processes,
    Snapshot,
    TemplateHandle,
    build,
    kill_pid,
    send_spawn,
    start_build,
    start_fresh,
    start_restore,
    start_template,
    wait_ready,
)


@pytest.fixture(scope="module")
def snapshots(
    module_processes: Processes, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Snapshot]:
    out = tmp_path_factory.mktemp("snapshots")
    builds = [start_build(module_processes, name, out / name)
              for name in ("counter_rt", "on_restore_rt", "random_rt")]
    return {started.bundle: started.snapshot() for started in builds}


@pytest.fixture(scope="module")
def counter_template(module_processes: Processes, snapshots: dict[str, Snapshot]
                     ) -> TemplateHandle:
    return start_template(module_processes, snapshots["counter_rt"])


def call(socket_path: str, payload: Any = None) -> Any:
    client = Client(socket_path)
    try:
        response = client.invoke(payload if payload is not None else {})
        assert response.status == 200, response.body
        return response.json()
    finally:
        client.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); the template reaps its children, so check state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_template_spawns_instances_that_skip_setup(
    counter_template: TemplateHandle, processes: Processes
) -> None:
    instances = [counter_template.spawn(processes) for _ in range(4)]
    pids = {instance.pid for instance in instances}
    assert len(pids) == 4 and counter_template.process.pid not in pids
    for instance in instances:
        assert set(instance.ready["timings"]) == {"map", "unpickle", "on_restore"}
        state = call(instance.socket)
        assert state["pid"] == instance.pid
        assert state["setup_calls"] == 1  # setup() ran once, in the build
        assert state["setup_pid"] not in pids | {counter_template.process.pid}


def test_setup_runs_in_the_build_only(
    module_processes: Processes, processes: Processes, tmp_path: Path
) -> None:
    setup_log = tmp_path / "setups"
    env = {"COUNTER_SETUP_LOG": str(setup_log)}
    snapshot = build(module_processes, "counter_rt", tmp_path / "snapshot", env=env)
    template = start_template(processes, snapshot, env=env)
    instances = [template.spawn(processes) for _ in range(3)]
    states = [call(instance.socket) for instance in instances]
    build_pid = {state["setup_pid"] for state in states}
    assert len(build_pid) == 1
    assert setup_log.read_text().split() == [str(build_pid.pop())]  # once, in the build


def test_instance_is_its_own_session_and_logs_to_its_file(
    counter_template: TemplateHandle, processes: Processes
) -> None:
    instance = counter_template.spawn(processes)
    assert os.getsid(instance.pid) == instance.pid
    # The template itself keeps serving spawns; the instance's output goes to its log.
    assert instance.log.exists()
    os.kill(instance.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while alive(instance.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(instance.pid)  # reaped by the template (SIGCHLD ignored)
    assert not Path(instance.socket).exists()  # removed on a clean stop
    assert "Traceback" not in instance.log.read_text()  # a stop is not a failure


def test_malformed_spawn_request_is_refused(counter_template: TemplateHandle) -> None:
    events = counter_template.request(b'{"op": "explode"}\n')
    assert len(events) == 1
    assert events[0]["event"] == "failed" and events[0]["stage"] == "spawn"
    events = counter_template.request(b"not json\n")
    assert events[0]["stage"] == "spawn"


def test_failed_restore_is_reported_and_template_survives(
    counter_template: TemplateHandle, processes: Processes, tmp_path: Path
) -> None:
    socket_path = processes.socket_path("broken")
    request = counter_template.snapshot.spawn_request(socket_path, tmp_path / "broken.log")
    # The descriptor of an empty pickle: the restore fails after the fork.
    (tmp_path / "empty.pickle").write_bytes(b"")
    request["pickle"] = str(tmp_path / "empty.pickle")
    events = send_spawn(counter_template.control, request)
    assert [e["event"] for e in events] == ["spawned", "failed"]
    processes.track(events[0]["pid"])
    assert events[1]["stage"] == "restore"
    assert events[1]["reason"].startswith("EOFError:")
    assert "Traceback" in (tmp_path / "broken.log").read_text()
    assert call(counter_template.spawn(processes).socket)["setup_calls"] == 1


def test_instances_die_with_their_template(
    snapshots: dict[str, Snapshot], processes: Processes
) -> None:
    template = start_template(processes, snapshots["counter_rt"])
    instance = template.spawn(processes)
    assert alive(instance.pid)
    template.process.popen.kill()
    template.process.wait()
    deadline = time.monotonic() + 10
    while alive(instance.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(instance.pid)  # PR_SET_PDEATHSIG


def test_on_restore_runs_after_every_restore(
    snapshots: dict[str, Snapshot], processes: Processes
) -> None:
    snapshot = snapshots["on_restore_rt"]
    fresh, fresh_socket = start_fresh(processes, "on_restore_rt")
    template = start_template(processes, snapshot)
    socket_path = processes.socket_path("restore")
    plain, answers = start_restore(processes, snapshot, socket_path)
    assert [a["event"] for a in answers] == ["spawned", "ready"], answers
    assert answers[0]["pid"] == plain.pid  # restored in itself, not forked
    wait_ready(fresh)
    wait_ready(plain)

    assert call(fresh_socket)["restores"] == 0  # a fresh start is not a restore
    restored_sockets = [template.spawn(processes).socket for _ in range(3)] + [socket_path]
    for restored_socket in restored_sockets:
        state = call(restored_socket)
        # Each restore starts from the snapshot (0) and ran on_restore once, in itself.
        assert state["restores"] == 1
        assert state["restored_in"] == state["pid"] != state["setup_pid"]


def test_restores_never_share_random_state(
    snapshots: dict[str, Snapshot], processes: Processes
) -> None:
    template = start_template(processes, snapshots["random_rt"])
    draws: dict[str, set[Any]] = {"random": set(), "numpy": set(), "torch": set(), "uuid": set()}
    total = 100
    batch = 10
    for _ in range(total // batch):
        instances = [template.spawn(processes) for _ in range(batch)]
        for instance in instances:
            for name, value in call(instance.socket).items():
                draws[name].add(value)
            kill_pid(instance.pid)
    for name, values in draws.items():
        assert len(values) == total, name
