"""Helpers for the in-instance runtime's tests: real `python -m thaw.snapshotter.runtime`
subprocesses, their status events, and an HTTP client over unix sockets."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "tests" / "fixtures" / "bundles"

# A build that imports torch takes a few seconds, one that loads the real model about
# ten on two cores; these bound a hang, they are not expectations.
EVENT_TIMEOUT_S = 120.0
HTTP_TIMEOUT_S = 60.0


def bundle_dir(name: str) -> Path:
    return BUNDLES / name


def handler_of(name: str) -> str:
    with open(bundle_dir(name) / "thaw.toml", "rb") as f:
        return str(tomllib.load(f)["handler"])


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    # Keep __pycache__ out of the fixture bundles.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra or {})
    return env


class EventStream:
    """JSON lines from a pipe or socket, with a deadline per event."""

    def __init__(self, fd: int, describe: Any = None) -> None:
        self.fd = fd
        self._buffer = b""
        self._describe = describe or (lambda: "")

    def next(self, timeout: float = EVENT_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no status event within {timeout}s{self._describe()}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"status stream closed without an event{self._describe()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        event = json.loads(line)
        assert isinstance(event, dict)
        return event


class RuntimeProcess:
    """One runtime subprocess; stdout/stderr go to a log file."""

    def __init__(self, mode: str, bundle: str, args: list[str], log_dir: Path,
                 env: dict[str, str] | None = None, handler: str | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        read_end, write_end = os.pipe()
        self.log_path = log_dir / f"{mode}-{bundle}-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "thaw.snapshotter.runtime", mode,
                 "--bundle", str(bundle_dir(bundle)),
                 "--handler", handler or handler_of(bundle),
                 "--status-fd", str(write_end), *args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                pass_fds=(write_end, *pass_fds), env=subprocess_env(env), cwd=log_dir,
            )
        os.close(write_end)
        self.pid = self.popen.pid
        self.events = EventStream(read_end, self.describe)

    def describe(self) -> str:
        return f"\n--- {self.log_path.name} ---\n{self.log()[-4000:]}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def event(self, timeout: float = EVENT_TIMEOUT_S) -> dict[str, Any]:
        return self.events.next(timeout)

    def wait(self, timeout: float = EVENT_TIMEOUT_S) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        with contextlib.suppress(OSError):
            os.close(self.events.fd)


def kill_pid(pid: int) -> None:
    """For template children, which are not our children (the template forked them)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Processes:
    """Everything a test (or a module's fixtures) started, stopped at teardown."""

    def __init__(self, log_dir: Path, socket_dir: Path) -> None:
        self.log_dir = log_dir
        self.socket_dir = socket_dir
        self._started: list[RuntimeProcess] = []
        self._pids: list[int] = []
        self._counter = 0

    def socket_path(self, stem: str) -> str:
        # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path is too long.
        self._counter += 1
        return str(self.socket_dir / f"{stem}-{self._counter}.sock")

    def start(self, mode: str, bundle: str, *args: str, env: dict[str, str] | None = None,
              handler: str | None = None, pass_fds: tuple[int, ...] = ()) -> RuntimeProcess:
        process = RuntimeProcess(mode, bundle, list(args), self.log_dir, env, handler,
                                 pass_fds)
        self._started.append(process)
        return process

    def track(self, pid: int) -> None:
        self._pids.append(pid)

    def stop_all(self) -> None:
        for pid in self._pids:
            kill_pid(pid)
        for process in reversed(self._started):
            process.stop()


@pytest.fixture(scope="session")
def socket_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="thaw-rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _processes(tmp: Path, socket_root: Path) -> Processes:
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    sockets = Path(tempfile.mkdtemp(dir=socket_root))
    return Processes(logs, sockets)


@pytest.fixture
def processes(tmp_path: Path, socket_root: Path) -> Iterator[Processes]:
    running = _processes(tmp_path, socket_root)
    yield running
    running.stop_all()


@pytest.fixture(scope="module")
def module_processes(
    tmp_path_factory: pytest.TempPathFactory, socket_root: Path
) -> Iterator[Processes]:
    running = _processes(tmp_path_factory.mktemp("module"), socket_root)
    yield running
    running.stop_all()


# --- HTTP over a unix socket ---------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = HTTP_TIMEOUT_S) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A keep-alive HTTP client for one instance socket."""

    def __init__(self, path: str) -> None:
        self.connection = UnixHTTPConnection(path)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        self.connection.request(method, path, body=body, headers=headers or {})
        response = self.connection.getresponse()
        data = response.read()
        return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, data)

    def invoke(self, payload: Any = None, path: str = "/invoke",
               headers: dict[str, str] | None = None) -> Response:
        body = b"" if payload is None else json.dumps(payload).encode()
        return self.request("POST", path, body, {"Content-Type": "application/json",
                                                 **(headers or {})})

    def close(self) -> None:
        self.connection.close()


# --- snapshots and templates ---------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    bundle: str
    folder: Path
    captured: dict[str, Any]

    @property
    def snapshot_json(self) -> str:
        return str(self.folder / "snapshot.json")

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / "snapshot.json").read_text())

    def spawn_request(self, socket_path: str, log: Path) -> dict[str, Any]:
        return {
            "op": "spawn",
            "instance_id": Path(socket_path).stem,
            "socket": socket_path,
            "pickle": str(self.folder / "state.pickle"),
            "host_arena": str(self.folder / "host.arena"),
            "device_arena": str(self.folder / "device.arena"),
            "snapshot_json": self.snapshot_json,
            "log": str(log),
        }



# Fields of a spawn record (as `Snapshot.spawn_request` writes it) naming files that go
# to the instance as descriptors, the way the agent sends them.
SPAWN_FILES = ("snapshot_json", "pickle", "host_arena")


def encode_spawn(record: dict[str, Any]) -> tuple[bytes, list[int]]:
    """A spawn record with file paths -> the line and the descriptors the agent would
    send (the caller closes them)."""
    fds = {name: os.open(record[name], os.O_RDONLY) for name in SPAWN_FILES
           if record.get(name)}
    line = {"op": "spawn", "instance_id": record["instance_id"], "socket": record["socket"],
            "log": record["log"], "fds": list(fds), "slice": record.get("slice"),
            "env": record.get("env", {})}
    return json.dumps(line).encode() + b"\n", list(fds.values())


def send_control(control: str, payload: bytes, fds: list[int] | tuple[int, ...] = ()
                 ) -> list[dict[str, Any]]:
    """Send one control line with its descriptors; return every event until the
    connection closes."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(EVENT_TIMEOUT_S)
    conn.connect(control)
    if fds:
        socket.send_fds(conn, [payload], list(fds))
    else:
        conn.sendall(payload)
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.close()
    return [json.loads(line) for line in data.splitlines()]


def send_spawn(control: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    line, fds = encode_spawn(record)
    try:
        return send_control(control, line, fds)
    finally:
        for fd in fds:
            os.close(fd)


@dataclass(frozen=True)
class Build:
    """A build under way; `snapshot()` waits for it."""

    process: RuntimeProcess
    bundle: str
    out: Path

    def snapshot(self) -> Snapshot:
        event = self.process.event()
        assert event["event"] == "captured", (event, self.process.describe())
        assert self.process.wait() == 0, self.process.describe()
        return Snapshot(self.bundle, self.out, event)


def start_build(processes: Processes, bundle: str, out: Path,
                env: dict[str, str] | None = None) -> Build:
    return Build(processes.start("build", bundle, "--out", str(out), env=env), bundle, out)


def build(processes: Processes, bundle: str, out: Path,
          env: dict[str, str] | None = None) -> Snapshot:
    return start_build(processes, bundle, out, env).snapshot()


@dataclass
class Instance:
    pid: int
    socket: str
    ready: dict[str, Any]
    log: Path

    def client(self) -> Client:
        return Client(self.socket)


class TemplateHandle:
    """A running template and the requests that make it fork instances."""

    def __init__(self, process: RuntimeProcess, control: str, snapshot: Snapshot,
                 processes: Processes) -> None:
        self.process = process
        self.control = control
        self.snapshot = snapshot
        self.processes = processes
        self.ready: dict[str, Any] = {}
        """Its template_ready event."""

    def request(self, payload: bytes, fds: tuple[int, ...] = ()) -> list[dict[str, Any]]:
        """Send one control line; return every event until the connection closes."""
        return send_control(self.control, payload, fds)

    def spawn(self, into: Processes, request: dict[str, Any] | None = None) -> Instance:
        socket_path = into.socket_path("instance")
        log = into.log_dir / f"{Path(socket_path).stem}.log"
        spawn = request or self.snapshot.spawn_request(socket_path, log)
        events = send_spawn(self.control, spawn)
        assert events and events[0]["event"] == "spawned", events
        into.track(events[0]["pid"])
        assert len(events) == 2 and events[1]["event"] == "ready", (
            events, Path(spawn["log"]).read_text() if Path(spawn["log"]).exists() else "")
        assert events[1]["pid"] == events[0]["pid"]
        return Instance(events[0]["pid"], spawn["socket"], events[1], Path(spawn["log"]))


def start_template(processes: Processes, snapshot: Snapshot,
                   env: dict[str, str] | None = None, handler: str | None = None
                   ) -> TemplateHandle:
    """A template given its snapshot.json as an inherited descriptor, as the agent
    starts one."""
    control = processes.socket_path("control")
    meta = os.open(snapshot.snapshot_json, os.O_RDONLY)
    try:
        process = processes.start("template", snapshot.bundle, "--snapshot-fd", str(meta),
                                  "--control", control, env=env, handler=handler,
                                  pass_fds=(meta,))
    finally:
        os.close(meta)
    event = process.event()
    assert event["event"] == "template_ready", (event, process.describe())
    assert event["pid"] == process.pid
    handle = TemplateHandle(process, control, snapshot, processes)
    handle.ready = event
    return handle


def start_fresh(processes: Processes, bundle: str) -> tuple[RuntimeProcess, str]:
    """Start (without waiting for ready); returns the process and its socket path."""
    socket_path = processes.socket_path(bundle)
    return processes.start("fresh", bundle, "--socket", socket_path), socket_path


def wait_ready(process: RuntimeProcess) -> dict[str, Any]:
    event = process.event()
    assert event["event"] == "ready", (event, process.describe())
    return event


def start_restore(processes: Processes, snapshot: Snapshot, socket_path: str,
                  request: dict[str, Any] | None = None, bundle: str | None = None,
                  handler: str | None = None
                  ) -> tuple[RuntimeProcess, list[dict[str, Any]]]:
    """A restore-mode process (a fresh interpreter, no fork) that was sent its spawn
    request; returns it and the answers on the control connection."""
    control = processes.socket_path("rcontrol")
    process = processes.start("restore", bundle or snapshot.bundle, "--control", control,
                              handler=handler)
    event = process.event()
    assert event["event"] == "template_ready", (event, process.describe())
    record = request or snapshot.spawn_request(
        socket_path, processes.log_dir / f"{Path(socket_path).stem}.log")
    return process, send_spawn(control, record)
