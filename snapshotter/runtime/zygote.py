"""A zygote: one process per Python environment (and sandbox) that has imported the
environment's heavy packages once, and forks templates from them on request, so every
template of the environment shares those pages copy-on-write instead of importing its
own copy.

The zygote imports the modules the agent lists (a snapshot's modules of the environment,
the function's own code left out: platform/zygotes.py), never tenant code of a bundle.
A forked child becomes a template exactly as a launched one does (template.py's
run_template): it enters its bundle, imports the rest of the function's modules, binds
its control socket and reports on the status pipe it was given.

Like a template, the zygote stays single-threaded and only imports: if its imports
initialised CUDA it says so in its `template_ready` and forks nothing.

Control protocol, one connection per template on the --control unix socket:
  agent -> zygote   {"op":"template","bundle":...,"handler":...,"control":...,"env":{...}}\\n
                    + three descriptors (SCM_RIGHTS), in order: the snapshot.json of the
                    template, the write end of its status pipe, its log (stdout, stderr)
  zygote -> agent   {"event":"spawned","pid":N}\\n or {"event":"failed",...}\\n
and the connection closes; the template then reports on its status pipe. The zygote
reports each forked template's exit on its own status channel (`child_exited`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import NoReturn

from .bounded import print_exception
from .events import (
    ChildExited,
    ExitCode,
    Failed,
    Spawned,
    Stage,
    StatusChannel,
    close_fds,
    describe_exception,
    event_to_line,
    receive_message,
)
from .forksafe import NVML_CHECK_ENV, CudaInitWatch
from .handler import HandlerRef, activate_bundle, import_handler_class
from .server import exit_on_sigterm
from .snapshot import read_descriptor
from .spawning import answer_forever
from .template import (
    MAX_SPAWN_REQUEST_BYTES,
    SPAWN_READ_TIMEOUT_S,
    announce_and_serve,
    preimport_modules,
    run_template,
    set_parent_death_signal,
)

TEMPLATE_OP = "template"
# How a template forked from a zygote fails when the function's code set environment
# variables while it was imported (`os.environ["X"] = ...` before `import torch`): the
# packages the zygote imported saw none of them, where a launched template imports the
# function's module first. The reason carries what was set, as JSON after this mark
# (a removed variable as null); the agent forks the template again from a zygote that
# imported with those set, or launches it (platform/templates.py).
IMPORT_ENV_MARK = "thaw-import-env:"
# Past this much JSON the variables are not carried (the template is launched).
MAX_IMPORT_ENV_CHARS = 1000


class ImportEnvChanged(Exception):
    """The function's import changed os.environ (see IMPORT_ENV_MARK)."""

    def __init__(self, changed: dict[str, str | None]) -> None:
        told = json.dumps(changed, sort_keys=True)
        if len(told) > MAX_IMPORT_ENV_CHARS:
            told = json.dumps({name: None for name in sorted(changed)[:20]})
        super().__init__(IMPORT_ENV_MARK + told)


def import_env_changes(before: dict[str, str]) -> dict[str, str | None]:
    """The variables set, changed (their value) or removed (None) since `before`."""
    now = dict(os.environ)
    changed: dict[str, str | None] = {k: v for k, v in now.items() if before.get(k) != v}
    changed.update({k: None for k in before if k not in now})
    changed.pop(NVML_CHECK_ENV, None)  # the runtime's own
    return changed
# The descriptors a template request carries, in this order.
TEMPLATE_FDS = ("snapshot", "status", "log")


@dataclass(frozen=True)
class TemplateRequest:
    """What the agent asks a zygote to fork a template with."""

    bundle: str
    handler: str
    control: str
    env: dict[str, str]
    """The template's own variables (its batch settings), set in the child."""
    import_env: dict[str, str] = dataclasses.field(default_factory=dict)
    """What the agent expects the function's import to set, as this zygote's imports
    ran with (IMPORT_ENV_MARK): taken out before the function is imported and checked
    to be set exactly so after."""

    @classmethod
    def from_line(cls, line: bytes) -> TemplateRequest:
        record = json.loads(line)
        if not isinstance(record, dict) or record.get("op") != TEMPLATE_OP:
            raise ValueError("a zygote takes template requests only")
        env = record.get("env") or {}
        import_env = record.get("import_env") or {}
        fields = (record.get("bundle"), record.get("handler"), record.get("control"))
        if not all(isinstance(f, str) and f for f in fields) or not all(
                isinstance(e, dict) and all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in e.items())
                for e in (env, import_env)):
            raise ValueError("a template request needs bundle, handler, control and env")
        return cls(str(record["bundle"]), str(record["handler"]), str(record["control"]),
                   {str(k): str(v) for k, v in env.items()},
                   {str(k): str(v) for k, v in import_env.items()})

    def to_line(self) -> bytes:
        return json.dumps({"op": TEMPLATE_OP, "bundle": self.bundle,
                           "handler": self.handler, "control": self.control,
                           "env": self.env, "import_env": self.import_env}).encode() + b"\n"


def _reap_templates(status: StatusChannel) -> None:
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            status.emit(ChildExited(pid, os.waitstatus_to_exitcode(wait_status)))


class Zygote:
    """The fork loop. Children never return into it: they end with os._exit."""

    def __init__(self, listener: socket.socket, status: StatusChannel) -> None:
        self._listener = listener
        self._status = status
        self._pid = os.getpid()

    def serve_forever(self) -> None:
        answer_forever(self._listener, self._fork)

    def _fork(self, conn: socket.socket) -> None:
        conn.settimeout(SPAWN_READ_TIMEOUT_S)
        fds: list[int] = []
        try:
            line, fds = receive_message(conn, MAX_SPAWN_REQUEST_BYTES)
            request = TemplateRequest.from_line(line)
            if len(fds) != len(TEMPLATE_FDS):
                raise ValueError(f"a template request carries {len(TEMPLATE_FDS)} "
                                 f"descriptors ({', '.join(TEMPLATE_FDS)}), not {len(fds)}")
        except (ValueError, TimeoutError) as exc:
            close_fds(fds)
            conn.sendall(event_to_line(Failed(Stage.SPAWN, describe_exception(exc))))
            return
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            close_fds(fds)
            conn.sendall(event_to_line(Failed(Stage.SPAWN, describe_exception(exc))))
            return
        if pid == 0:
            conn.close()  # the agent's connection is the zygote's to answer
            self._become_template(request, fds)
        close_fds(fds)  # the child has its own copies
        conn.sendall(event_to_line(Spawned(pid)))

    def _become_template(self, request: TemplateRequest, fds: list[int]) -> NoReturn:
        snapshot_fd, status_fd, log_fd = fds
        code: int = ExitCode.IMPORT_FAILED
        try:
            self._listener.close()
            if self._status.fd is not None and self._status.fd > 2:
                os.close(self._status.fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.setsid()
            # The template dies with its zygote, as a launched one dies with the agent.
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != self._pid:
                os._exit(code)
            _adopt_output(log_fd)
            os.environ.update(request.env)
            for name in request.import_env:  # the function's import sets them again
                os.environ.pop(name, None)
            ref = HandlerRef.parse(request.bundle, request.handler)
            activate_bundle(ref)
            before = dict(os.environ)

            def import_checked() -> object:
                handler = import_handler_class(ref)
                changed = import_env_changes(before)
                if changed != request.import_env:
                    raise ImportEnvChanged(changed)
                return handler

            code = run_template(snapshot_fd, request.control, StatusChannel.for_fd(status_fd),
                                import_checked)
        except SystemExit as stop:  # SIGTERM (exit_on_sigterm): the agent's polite stop
            code = stop.code if isinstance(stop.code, int) else ExitCode.OK
        except BaseException:
            print_exception()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _adopt_output(log_fd: int) -> None:
    """The template's stdout and stderr are its own log, as a launched template's are."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def zygote_modules(modules_fd: int) -> list[str]:
    """The module names the agent gave (a JSON object with "modules")."""
    record = json.loads(read_descriptor(modules_fd))
    names = record.get("modules") if isinstance(record, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("the zygote's modules must be a JSON object with a 'modules' list")
    return names


def run_zygote(modules_fd: int, control: str, status: StatusChannel) -> ExitCode:
    """Import, announce, fork templates on request; returns only on SIGTERM/SIGINT."""
    set_parent_death_signal(signal.SIGKILL)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: _reap_templates(status))
    exit_on_sigterm()
    # As in a template: torch.cuda.is_available() asks NVML instead of initialising CUDA.
    os.environ.setdefault(NVML_CHECK_ENV, "1")
    # `python -m` put the working directory first on sys.path: nothing of a bundle may
    # be imported here, only the environment's packages.
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", cwd)]
    watch = CudaInitWatch()
    started = time.perf_counter()
    try:
        names = zygote_modules(modules_fd)
        os.close(modules_fd)
        preimport_modules(names, watch.after_import)
    except Exception as exc:
        print_exception()
        status.emit(Failed(Stage.IMPORT, describe_exception(exc)))
        return ExitCode.IMPORT_FAILED
    elapsed = time.perf_counter() - started
    unsafe_reason = watch.verdict()
    if unsafe_reason is None and threading.active_count() > 1:
        # A template goes on importing after the fork: a lock another thread held at
        # that moment would never be released in it. Its templates launch instead.
        unsafe_reason = f"its imports started {threading.active_count() - 1} thread(s)"
    return announce_and_serve(control, status, elapsed, unsafe_reason,
                              "thaw zygote: not forking templates",
                              lambda listener: Zygote(listener, status).serve_forever())
