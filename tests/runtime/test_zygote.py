"""The zygote mode of the in-instance runtime, with real processes: it imports the
modules it is given (never a bundle's), forks templates of different bundles that
import the rest of their code, serve spawn requests and answer; it refuses a request
that is not a template request, and reports each forked template's exit
(snapshotter/runtime/zygote.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runtime.conftest import (
    BUNDLES,
    EventStream,
    Processes,
    Snapshot,
    build,
    handler_of,
    send_control,
    send_spawn,
    subprocess_env,
)
from thaw.platform.zygotes import import_env_set
from thaw.snapshotter.runtime.zygote import TemplateRequest


class ZygoteProcess:
    def __init__(self, processes: Processes, modules: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.control = processes.socket_path("zygote")
        read_end, write_end = os.pipe()
        modules_file = processes.log_dir / "zygote-modules.json"
        modules_file.write_text(json.dumps({"modules": modules}))
        modules_fd = os.open(modules_file, os.O_RDONLY)
        self.log_path = processes.log_dir / "zygote.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "thaw.snapshotter.runtime", "zygote",
                 "--snapshot-fd", str(modules_fd), "--control", self.control,
                 "--status-fd", str(write_end)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                pass_fds=(write_end, modules_fd), env=subprocess_env(env),
                cwd=processes.log_dir)
        os.close(write_end)
        os.close(modules_fd)
        self.events = EventStream(read_end, lambda: self.log_path.read_text())

    def fork(self, snapshot: Snapshot, processes: Processes,
             import_env: dict[str, str] | None = None) -> tuple[int, EventStream, str]:
        """A template of `snapshot`'s bundle: (its pid, its status stream, its control)."""
        control = processes.socket_path("template")
        request = TemplateRequest(str(BUNDLES / snapshot.bundle), handler_of(snapshot.bundle),
                                  control, {"THAW_TEST_TEMPLATE_ENV": "set"},
                                  import_env or {})
        status_read, status_write = os.pipe()
        fds = [os.open(snapshot.snapshot_json, os.O_RDONLY), status_write,
               os.open(processes.log_dir / f"template-{snapshot.bundle}.log",
                       os.O_WRONLY | os.O_CREAT | os.O_APPEND)]
        try:
            answers = send_control(self.control, request.to_line(), fds)
        finally:
            for fd in fds:
                os.close(fd)
        assert [a["event"] for a in answers] == ["spawned"], answers
        pid = int(answers[0]["pid"])
        processes.track(pid)
        return pid, EventStream(status_read), control

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            self.popen.wait(10)


@pytest.fixture
def zygote(processes: Processes) -> Iterator[ZygoteProcess]:
    running = ZygoteProcess(processes, ["json", "decimal", "echo_app_never_imported"])
    yield running
    running.stop()


def test_templates_of_two_bundles_fork_from_one_zygote_and_serve(
        zygote: ZygoteProcess, processes: Processes, tmp_path: Path) -> None:
    ready = zygote.events.next()
    assert ready["event"] == "template_ready" and ready["fork_safe"] is True, ready

    answers = send_control(zygote.control, b'{"op":"spawn"}\n')
    assert answers and answers[0]["event"] == "failed", answers

    for bundle in ("echo_rt", "counter_rt"):
        snapshot = build(processes, bundle, tmp_path / f"snap-{bundle}")
        pid, status, control = zygote.fork(snapshot, processes)
        event = status.next()
        assert event["event"] == "template_ready" and event["pid"] == pid, event
        with open(f"/proc/{pid}/stat") as stat:
            assert int(stat.read().rsplit(")", 1)[1].split()[1]) == zygote.popen.pid

        socket_path = processes.socket_path("instance")
        spawned = send_spawn(control, snapshot.spawn_request(
            socket_path, processes.log_dir / f"instance-{bundle}.log"))
        assert [e["event"] for e in spawned] == ["spawned", "ready"], spawned
        processes.track(spawned[0]["pid"])

        os.kill(pid, signal.SIGKILL)
        exited = zygote.events.next()
        assert exited == {"event": "child_exited", "pid": pid, "returncode": -9}, exited


def test_a_zygote_whose_imports_started_a_thread_forks_nothing(
        processes: Processes, tmp_path: Path) -> None:
    packages = tmp_path / "packages"
    packages.mkdir()
    (packages / "starts_a_thread.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n")
    pythonpath = os.pathsep.join(p for p in (str(packages), os.environ.get("PYTHONPATH"))
                                 if p)
    zygote = ZygoteProcess(processes, ["starts_a_thread"], {"PYTHONPATH": pythonpath})
    try:
        ready = zygote.events.next()
        assert ready["event"] == "template_ready" and ready["fork_safe"] is False, ready
        assert "1 thread" in ready["unsafe_reason"]
        request = TemplateRequest(str(BUNDLES / "echo_rt"), handler_of("echo_rt"),
                                  processes.socket_path("template"), {})
        answers = send_control(zygote.control, request.to_line())
        assert answers and answers[0]["event"] == "failed", answers
    finally:
        zygote.stop()


def test_a_template_whose_code_sets_the_environment_at_import_says_what_it_set(
        processes: Processes, tmp_path: Path) -> None:
    """Its zygote's packages were imported without the variable; the template says so
    (the agent then forks it from a zygote that imports with it set), and a zygote
    started with it set forks the template."""
    snapshot = build(processes, "import_env_rt", tmp_path / "snap")
    plain = ZygoteProcess(processes, ["json"])
    try:
        assert plain.events.next()["event"] == "template_ready"
        pid, status, _control = plain.fork(snapshot, processes)
        failed = status.next()
        assert failed["event"] == "failed" and failed["stage"] == "import", failed
        assert import_env_set(failed["reason"]) == {"THAW_TEST_IMPORT_SETTING": "on"}
    finally:
        plain.stop()
    setting = {"THAW_TEST_IMPORT_SETTING": "on"}
    learned = ZygoteProcess(processes, ["json"], setting)
    try:
        assert learned.events.next()["event"] == "template_ready"
        pid, status, _control = learned.fork(snapshot, processes, setting)
        ready = status.next()
        assert ready["event"] == "template_ready" and ready["pid"] == pid, ready
        # A function that sets nothing is not served by a zygote that imported with
        # the variable: its template says it set nothing.
        other = build(processes, "echo_rt", tmp_path / "snap-echo")
        pid, status, _control = learned.fork(other, processes, setting)
        failed = status.next()
        assert failed["event"] == "failed", failed
        assert import_env_set(failed["reason"]) == {}
    finally:
        learned.stop()
