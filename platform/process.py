"""The process runtime: instances are processes running thaw.snapshotter.runtime,
started fresh, or forked from a per-snapshot template that already imported the
function's modules (DESIGN.md §7). Status events arrive as JSON lines on a pipe."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from thaw.core.errors import DeadlineExceeded, InstanceFailed, SnapshotError
from thaw.core.eventloop import read_pipe_file

log = structlog.get_logger()

RUNTIME_MODULE = "thaw.snapshotter.runtime"
PR_SET_PDEATHSIG = 1
# Lines of an instance's log quoted in an error when it dies before it is ready.
LOG_TAIL_LINES = 15
# Grace between SIGTERM and SIGKILL when stopping an instance.
STOP_GRACE_SECONDS = 5.0


def _die_with_parent() -> None:
    """preexec: SIGKILL this child when the agent dies, so nothing is orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class RuntimeProcess:
    """A runtime subprocess the agent started, with its status-event pipe."""

    proc: asyncio.subprocess.Process
    events: asyncio.StreamReader
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def next_event(self, timeout: float) -> dict[str, Any]:
        """The next status event; if the process dies first, an InstanceFailed saying why."""
        try:
            line = await asyncio.wait_for(self.events.readline(), timeout)
        except TimeoutError as exc:
            await self.kill()
            raise DeadlineExceeded(f"instance did not report within {timeout:.0f}s") from exc
        if not line:
            code = await self.proc.wait()
            tail = log_tail(self.log_path)
            raise InstanceFailed(f"instance exited ({describe_exit(code)}) before it was "
                                 f"ready" + (f"; last output:\n{tail}" if tail else ""))
        event: dict[str, Any] = json.loads(line)
        return event

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ProcessRuntime:
    """Instances are processes on this machine. The docker runtime
    (docker_runtime.py) has the same three methods."""

    name = "process"

    def __init__(self, python: str | None = None, env: dict[str, str] | None = None) -> None:
        self.python = python or sys.executable
        self.env = {**os.environ, **(env or {})}

    async def spawn(self, control_socket: str, request: dict[str, Any],
                    timeout: float) -> tuple[int, dict[str, Any]]:
        """Fork a restored instance from a template: (host pid, ready event)."""
        return await spawn_from_template(control_socket, request, timeout)

    async def build_in_template(self, control_socket: str, request: dict[str, Any],
                                timeout: float) -> dict[str, Any]:
        """Have a template fork a child that runs setup() and captures a snapshot:
        returns its `captured` or `failed` event."""
        return await template_build(control_socket, request, timeout)

    async def close(self) -> None:
        """Nothing to release: instances and templates are stopped by the agent."""

    def fingerprint(self) -> dict[str, str]:
        """Instances run the agent's own Python: nothing to add to its fingerprint."""
        return {}

    async def launch(self, mode: str, args: Sequence[str], log_path: str,
                     cwd: str | None = None, env: dict[str, str] | None = None, *,
                     instance_id: str | None = None, memory_limit_bytes: int = 0,
                     max_instances: int | None = None,
                     gpu_device_ids: Sequence[str] = (), image: str = "") -> RuntimeProcess:
        """Start the runtime in `mode`. The keyword-only arguments are for runtimes
        that size a sandbox per launch (docker); here the agent caps memory per
        process with RLIMIT_DATA instead. `image` (an image function's) cannot run
        here: the agent refuses those before launching (agent.IMAGE_NEEDS_DOCKER)."""
        del instance_id, memory_limit_bytes, max_instances, gpu_device_ids
        if image:
            raise InstanceFailed(f"the process runtime cannot run image {image}")
        read_fd, write_fd = os.pipe()
        os.set_inheritable(write_fd, True)
        logfile = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python, "-m", RUNTIME_MODULE, mode, *args, "--status-fd", str(write_fd),
                stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                pass_fds=(write_fd,), start_new_session=True, preexec_fn=_die_with_parent,
                env={**self.env, **(env or {})}, cwd=cwd)
        finally:
            os.close(write_fd)
            logfile.close()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                     read_pipe_file(read_fd))
        return RuntimeProcess(proc, reader, log_path)


async def _ask_template(control_socket: str, op: str, request: dict[str, Any],
                        timeout: float, what: str) -> tuple[int, dict[str, Any] | None]:
    """One exchange on a template's control socket: the child's pid (from `spawned`)
    and the child's own answer, or None if it ended before answering."""
    try:
        reader, writer = await asyncio.open_unix_connection(control_socket, limit=1 << 20)
    except OSError as exc:
        raise InstanceFailed(f"template is not reachable: {exc}") from exc
    pid = 0
    try:
        writer.write(json.dumps({"op": op, **request}).encode() + b"\n")
        await writer.drain()
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except TimeoutError as exc:
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                raise DeadlineExceeded(f"{what} did not finish within {timeout:.0f}s") from exc
            if not line:
                return pid, None
            event: dict[str, Any] = json.loads(line)
            if event.get("event") == "spawned":
                pid = int(event["pid"])
                continue
            return pid, event
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _last_output(request: dict[str, Any]) -> str:
    tail = log_tail(request.get("log", ""))
    return f"; last output:\n{tail}" if tail else ""


async def spawn_from_template(control_socket: str, request: dict[str, Any],
                              timeout: float) -> tuple[int, dict[str, Any]]:
    """Ask a template to fork a restored instance; returns (pid, ready event)."""
    pid, event = await _ask_template(control_socket, "spawn", request, timeout, "restore")
    if event is None:
        raise InstanceFailed("restored instance exited before it was ready"
                             + _last_output(request))
    if event.get("event") != "ready":
        raise SnapshotError(f"restore failed: {event.get('reason', 'unknown')}")
    return pid, event


async def template_build(control_socket: str, request: dict[str, Any],
                         timeout: float) -> dict[str, Any]:
    """Ask a template to fork a child that runs setup() and captures: its `captured`
    or `failed` event."""
    _pid, event = await _ask_template(control_socket, "build", request, timeout, "build")
    if event is None:
        return {"event": "failed", "stage": "setup",
                "reason": "the build process exited before capturing" + _last_output(request)}
    return event


class ProcessWatch:
    """Tells when any process ends (not only our children): pidfd on Linux."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.done = asyncio.Event()
        self._fd: int | None = None
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.done.set()
            return
        asyncio.get_running_loop().add_reader(self._fd, self._fired)

    def _fired(self) -> None:
        self.close()
        self.done.set()

    def close(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


async def terminate(pid: int, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM the instance's process group, SIGKILL after `grace`."""
    watch = ProcessWatch(pid)
    if watch.done.is_set():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(watch.done.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        await watch.done.wait()
    finally:
        watch.close()


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
