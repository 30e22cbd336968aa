"""The process runtime: instances are processes running thaw.snapshotter.runtime,
started fresh, or forked from a per-snapshot template that already imported the
function's modules (DESIGN.md §7). Status events arrive as JSON lines on a pipe; a
template gets its snapshot.json as an inherited memfd, and every restore gets its
snapshot and slice as descriptors sent with the spawn request (SCM_RIGHTS)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from thaw.core.errors import DeadlineExceeded, InstanceFailed, SnapshotError
from thaw.core.eventloop import read_pipe_file
from thaw.core.unixpeer import check_peer
from thaw.platform.logs import strip_call_marks
from thaw.platform.memfds import text_memfd
from thaw.platform.runtime import (
    BuildRequest,
    Exited,
    InstanceHandle,
    InstanceStats,
    LaunchMode,
    LaunchSpec,
    RuntimeCapabilities,
    SandboxPolicy,
    SpawnRequest,
    StatusEvent,
    ToolRun,
    describe_exit,
    exit_event,
    parse_status,
    spawn_request,
)
from thaw.platform.sandbox import network
from thaw.platform.sandbox.areas import open_tenant_file
from thaw.platform.sandbox.plan import SandboxSettings, build_plan, launcher_command
from thaw.snapshotter.runtime.events import close_fds

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
        with open(open_tenant_file(path), "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    # A call's lines carry its request id's mark in the file (platform/logs.py).
    return strip_call_marks("\n".join(text.strip().splitlines()[-lines:]))


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
        except ValueError as exc:  # a status line past the reader's limit
            await self.kill()
            raise InstanceFailed("instance wrote a status line too long to read") from exc
        if not line:
            code = await self.proc.wait()
            tail = log_tail(self.log_path)
            raise InstanceFailed(f"instance exited ({describe_exit(code)}) before it was "
                                 f"ready" + (f"; last output:\n{tail}" if tail else ""))
        return await self._decode(line)

    async def _decode(self, line: bytes) -> dict[str, Any]:
        """A status line as its record; a line that is not a JSON object ends the
        instance (it is not speaking the runtime's protocol)."""
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            await self.kill()
            raise InstanceFailed(f"instance wrote a status line that is not a JSON object: "
                                 f"{line[:200]!r}")
        return event

    async def next_status(self, timeout: float) -> StatusEvent:
        """`next_event` as its typed record; a record of no known shape reads as a
        failed start."""
        record = await self.next_event(timeout)
        typed = parse_status(record)
        if typed is None:
            raise InstanceFailed(f"instance reported an unknown event: {record}")
        return typed

    async def exited(self) -> Exited:
        """Waits for the process to end."""
        return exit_event(await self.proc.wait())

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()



def process_stats(handle: InstanceHandle) -> InstanceStats:
    """Resident memory of an instance's process, from /proc (blocking)."""
    try:
        with open(f"/proc/{handle.pid}/status") as status:
            rss_kb = next((int(line.split()[1]) for line in status
                           if line.startswith("VmRSS:")), 0)
    except (OSError, ValueError):
        return InstanceStats(handle.pid, alive=False)
    return InstanceStats(handle.pid, alive=True, rss_bytes=rss_kb * 1024)


def _build_request(request: BuildRequest | Mapping[str, Any]) -> BuildRequest:
    if isinstance(request, BuildRequest):
        return request
    return BuildRequest.from_record(dict(request))


# The only variables an instance takes from the agent's environment: where programs
# and shared libraries are (a GPU node's CUDA libraries may be on LD_LIBRARY_PATH) and
# the locale. Everything else it gets is what its LaunchSpec says: the agent's own
# settings, addresses and credentials never reach tenant code.
INHERITED_ENV = ("PATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "TZ")
# Set for every instance unless its LaunchSpec says otherwise: a home that is not the
# agent's (caches a library writes under ~ go to the instance's /tmp).
INSTANCE_DEFAULT_ENV = {"HOME": "/tmp", "LANG": "C.UTF-8"}


def base_environment(source: Mapping[str, str]) -> dict[str, str]:
    """An instance's environment before its LaunchSpec's: INSTANCE_DEFAULT_ENV, then
    the INHERITED_ENV names `source` (the agent's environment) has."""
    inherited = {name: source[name] for name in INHERITED_ENV if name in source}
    return {**INSTANCE_DEFAULT_ENV, **inherited}


class ProcessRuntime:
    """Instances are processes on this machine (the `Runtime` protocol). An instance's
    environment is base_environment() plus what its LaunchSpec says (and `env`, the
    operator's additions for every instance), never the agent's own.

    With `sandbox` settings (the agent's default), every process it launches runs in a
    sandbox of its own under its tenant's uid (platform/sandbox/): its template's
    forks inherit it, so templates are per tenant. Without, instances run as the
    agent's user, for development and for tests that drive a runtime by hand."""

    name = "process"

    def __init__(self, python: str | None = None, env: dict[str, str] | None = None,
                 sandbox: SandboxSettings | None = None) -> None:
        self.python = python or sys.executable
        self.env = {**base_environment(os.environ), **(env or {})}
        self.sandbox = sandbox
        self.capabilities = RuntimeCapabilities(
            runs_images=False, template_per_tenant=sandbox is not None,
            uid_per_tenant=sandbox is not None, python_environments=True)
        self._companions: set[asyncio.Task[None]] = set()
        """One per sandbox with egress: stops its slirp4netns when the sandbox ends."""

    async def spawn(self, control_socket: str,
                    request: SpawnRequest | Mapping[str, Any],
                    timeout: float) -> tuple[int, dict[str, Any]]:
        """Fork a restored instance from a template (or restore in a restore-mode
        instance, which answers the same way): (host pid, ready event)."""
        with spawn_request(request) as typed:
            return await spawn_from_template(control_socket, typed, timeout)

    async def build_in_template(self, control_socket: str,
                                request: BuildRequest | Mapping[str, Any],
                                timeout: float) -> dict[str, Any] | None:
        """Have a template fork a child that runs setup() and captures a snapshot:
        returns its `captured` or `failed` event."""
        return await template_build(control_socket, _build_request(request), timeout)

    async def stop(self, handle: InstanceHandle, reason: str) -> None:
        """SIGTERM the instance's process group, SIGKILL after a grace."""
        del reason  # the agent logs it
        await terminate(handle.pid)

    def stats(self, handle: InstanceHandle) -> InstanceStats:
        return process_stats(handle)

    async def close(self) -> None:
        """Instances and templates are stopped by the agent; what connects their
        networks ends with them (or here)."""
        for task in list(self._companions):
            task.cancel()
        await asyncio.gather(*self._companions, return_exceptions=True)

    def fingerprint(self) -> dict[str, str]:
        """Instances run the agent's own Python: nothing to add to its fingerprint."""
        return {}

    async def run_tool(self, tool: ToolRun) -> tuple[int, str]:
        """Run a node tool (the environment builder's uv) to its end: sandboxed under
        `tool.uid` like an instance where this runtime sandboxes, else as the agent's
        user. Returns (exit status, the tail of its output); a run past `tool.timeout`
        is killed and answers DeadlineExceeded."""
        env = {**base_environment(os.environ), **tool.env}
        read_fd, write_fd = os.pipe()
        passed = [write_fd]
        command = list(tool.argv)
        sync: socket.socket | None = None
        proc: asyncio.subprocess.Process | None = None
        slirp: asyncio.subprocess.Process | None = None
        try:
            if self.sandbox is not None:
                spec = LaunchSpec(mode=LaunchMode.BUILD, bundle="", handler="", log_path="",
                                  instance_id="tool", cwd=tool.workdir,
                                  sandbox=SandboxPolicy(network=tool.network, uid=tool.uid,
                                                        gid=tool.uid, writable=tool.writable))
                plan = await asyncio.to_thread(build_plan, spec, self.sandbox, self.python, env)
                plan["read_only"] = [*plan["read_only"], *tool.read_only]  # type: ignore[misc]
                if tool.network == "egress":
                    sync, sync_child = socket.socketpair()
                    passed.append(os.dup(sync_child.fileno()))
                    sync_child.close()
                    plan["sync_fd"] = passed[-1]
                command = launcher_command(plan, command)
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                pass_fds=tuple(passed), start_new_session=True, preexec_fn=_die_with_parent,
                env=env, cwd=tool.workdir or None)
            close_fds(passed)
            passed = []
            if sync is not None:
                # slirp4netns's own messages are dropped: it outlives the output pipe.
                quiet = os.open(os.devnull, os.O_WRONLY)
                try:
                    with sync:
                        slirp = await network.connect(proc.pid, sync, quiet)
                finally:
                    os.close(quiet)
            output = await asyncio.wait_for(
                asyncio.to_thread(_read_tail, read_fd, tool.max_output), tool.timeout)
            return await proc.wait(), output
        except TimeoutError as exc:
            raise DeadlineExceeded(f"{tool.argv[0]} did not finish within "
                                   f"{tool.timeout:.0f}s") from exc
        finally:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            if slirp is not None:
                await network.stop(slirp)
            if sync is not None:
                sync.close()
            close_fds(passed)
            with contextlib.suppress(OSError):
                os.close(read_fd)

    async def launch(self, spec: LaunchSpec) -> RuntimeProcess:
        """Start the runtime as `spec` says. Limits are the agent's to apply here
        (RLIMIT_DATA per process); an image function's image cannot run here: the agent
        refuses those before launching."""
        if spec.image:
            raise InstanceFailed(f"the process runtime cannot run image {spec.image}")
        read_fd, write_fd = os.pipe()
        os.set_inheritable(write_fd, True)
        passed = [write_fd]
        extra: list[str] = []
        # The log may be in the tenant's area: never follow a link planted there.
        logfile = open_tenant_file(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        env = {**self.env, **spec.environment}
        sync: socket.socket | None = None
        proc: asyncio.subprocess.Process | None = None
        try:
            if spec.snapshot is not None:
                meta_fd = await asyncio.to_thread(text_memfd, "thaw-template-meta",
                                                  spec.snapshot.snapshot_json)
                passed.append(meta_fd)
                extra += ["--snapshot-fd", str(meta_fd)]
            python = self.python
            if spec.python_env is not None:
                # The function's own environment: its interpreter, and the runtime
                # package on its path (the environment has only the function's packages).
                python = spec.python_env.python
                env["PYTHONPATH"] = spec.python_env.runtime_path
            command = [python, "-m", RUNTIME_MODULE, *spec.command(), *extra,
                       "--status-fd", str(write_fd)]
            if self.sandbox is not None:
                plan = await asyncio.to_thread(build_plan, spec, self.sandbox, python, env)
                if plan["network"] == "egress":
                    sync, sync_child = socket.socketpair()
                    passed.append(os.dup(sync_child.fileno()))
                    sync_child.close()
                    plan["sync_fd"] = passed[-1]
                command = launcher_command(plan, command)
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                pass_fds=tuple(passed), start_new_session=True, preexec_fn=_die_with_parent,
                env=env, cwd=spec.workdir or None)
            if sync is not None:
                with sync:
                    slirp = await network.connect(proc.pid, sync, logfile)
                task = asyncio.create_task(_outlive(proc, slirp))
                self._companions.add(task)
                task.add_done_callback(self._companions.discard)
        except BaseException:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            if sync is not None:
                sync.close()
            close_fds(passed)
            os.close(logfile)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                     read_pipe_file(read_fd))
        return RuntimeProcess(proc, reader, spec.log_path)


async def _outlive(proc: asyncio.subprocess.Process,
                   slirp: asyncio.subprocess.Process) -> None:
    """Stop a sandbox's slirp4netns once the sandbox's process has ended (its forks
    share its namespace; they end with it: PDEATHSIG)."""
    try:
        await proc.wait()
    finally:
        await network.stop(slirp)


def send_request(control_socket: str, line: bytes, fds: Sequence[int],
                 timeout: float) -> socket.socket:
    """Connect to a control socket and send one line with its descriptors in the same
    message (SCM_RIGHTS), blocking: call from a thread. Returns the connected socket."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        conn.connect(control_socket)
        # The request carries the tenant's snapshot: only its own template may get it.
        check_peer(conn, control_socket)
        sent = socket.send_fds(conn, [line], list(fds)) if fds else conn.send(line)
        if sent < len(line):
            conn.sendall(line[sent:])
    except BaseException:
        conn.close()
        raise
    return conn


async def open_request(control_socket: str, request: SpawnRequest | BuildRequest,
                       timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a request to a template's (or restore-mode instance's) control socket; the
    streams to read its answers from."""
    if isinstance(request, SpawnRequest):
        line, fds = request.to_message()
    else:
        line = json.dumps({"op": request.op, **dataclasses.asdict(request)}).encode() + b"\n"
        fds = []
    try:
        conn = await asyncio.to_thread(send_request, control_socket, line, fds, timeout)
    except OSError as exc:
        raise InstanceFailed(f"template is not reachable: {exc}") from exc
    return await asyncio.open_unix_connection(sock=conn, limit=1 << 20)


async def _ask_template(control_socket: str, request: SpawnRequest | BuildRequest,
                        timeout: float, what: str) -> tuple[int, dict[str, Any] | None]:
    """One exchange on a template's control socket: the child's pid (from `spawned`)
    and the child's own answer, or None if it ended before answering."""
    reader, writer = await open_request(control_socket, request, timeout)
    pid = 0
    try:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except (TimeoutError, ValueError) as exc:
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if isinstance(exc, ValueError):  # past the reader's limit
                    raise InstanceFailed(f"{what} wrote an answer too long to read") from exc
                raise DeadlineExceeded(f"{what} did not finish within {timeout:.0f}s") from exc
            if not line:
                return pid, None
            try:
                event: dict[str, Any] = json.loads(line)
            except ValueError:
                event = {}
            if not isinstance(event, dict) or not event:
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                raise InstanceFailed(f"{what} answered with something other than a JSON "
                                     f"object: {line[:200]!r}")
            if event.get("event") == "spawned":
                pid = int(event["pid"])
                continue
            return pid, event
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _last_output(request: SpawnRequest | BuildRequest) -> str:
    tail = log_tail(request.log)
    return f"; last output:\n{tail}" if tail else ""


async def spawn_from_template(control_socket: str, request: SpawnRequest,
                              timeout: float) -> tuple[int, dict[str, Any]]:
    """Ask a template to fork a restored instance; returns (pid, ready event)."""
    pid, event = await _ask_template(control_socket, request, timeout, "restore")
    if event is None:
        raise InstanceFailed("restored instance exited before it was ready"
                             + _last_output(request))
    if event.get("event") != "ready":
        raise SnapshotError(f"restore failed: {event.get('reason', 'unknown')}")
    return pid, event


async def template_build(control_socket: str, request: BuildRequest,
                         timeout: float) -> dict[str, Any]:
    """Ask a template to fork a child that runs setup() and captures: its `captured`
    or `failed` event."""
    _pid, event = await _ask_template(control_socket, request, timeout, "build")
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


def _read_tail(fd: int, limit: int) -> str:
    """Everything written to the pipe `fd` until its writers close it, keeping only the
    last `limit` bytes (blocking: from a thread)."""
    tail = b""
    while chunk := os.read(fd, 65536):
        tail = (tail + chunk)[-limit:]
    return tail.decode(errors="replace")


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
