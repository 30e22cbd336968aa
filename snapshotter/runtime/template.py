"""A template (zygote): a process that has imported a function's modules and forks
instances that restore from a snapshot, so no instance pays for the imports.

The template must stay single-threaded and must not run torch ops: forking a process
with running threads (an OpenMP pool, a tokenizer's rayon pool) can leave the child
holding locks no thread will ever release. It only imports.

Control protocol, one connection per spawn on the --control unix socket:
  agent -> template   {"op":"spawn", ...SpawnRequest}\\n  + its descriptors (SCM_RIGHTS)
  template -> agent   {"event":"spawned","pid":N}\\n         (from the template)
  child -> agent      {"event":"ready",...}\\n or failed      (from the instance)
and the connection closes; the instance then serves on its own socket.

A spawn request naming the restored-template role forks a restored template instead
(restored_template.py): a child that restores the snapshot's host state once and forks
its instances. The template is a child subreaper, so those instances become its
children once their short-lived parent exits: it reaps them and reports their exit
like its own forks'.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn

from . import secretenv
from .bounded import print_exception
from .capture import CaptureError, capture
from .events import (
    BuildRequest,
    Captured,
    ChildExited,
    ExitCode,
    Failed,
    Ready,
    Spawned,
    SpawnRequest,
    Stage,
    StatusChannel,
    TemplateReady,
    close_fds,
    describe_exception,
    event_to_line,
    receive_message,
)
from .forksafe import NVML_CHECK_ENV, CudaInitWatch
from .handler import Invoker, create_handler
from .restore import restore_request
from .server import bind_server, exit_on_sigterm, serve_until_stopped
from .signature import refused_schema
from .snapshot import SnapshotMeta

# Re-exported: the runtime's entry point and zygotes take them from here.
from .spawning import (
    MAX_SPAWN_REQUEST_BYTES as MAX_SPAWN_REQUEST_BYTES,
)
from .spawning import (
    SPAWN_READ_TIMEOUT_S as SPAWN_READ_TIMEOUT_S,
)
from .spawning import (
    answer_forever,
    redirect_output,
    set_child_subreaper,
    wait_for_go,
)
from .spawning import (
    bind_control_socket as bind_control_socket,
)
from .spawning import (
    read_request as read_request,
)
from .spawning import (
    set_parent_death_signal as set_parent_death_signal,
)
from .warmup import run_warmup

# Module names that are never importable by name.
_NOT_IMPORTABLE = ("__main__", "__mp_main__")


def preimport_modules(names: Iterable[str],
                      after_each: Callable[[str], None] | None = None) -> list[str]:
    """Import what the function imported, in the same order; returns the names that
    failed (some recorded modules only import as a side effect of another).
    `after_each` sees each name this call tried to import, in order."""
    failed = []
    for name in names:
        if name in sys.modules or name in _NOT_IMPORTABLE:
            continue
        try:
            importlib.import_module(name)
        except (Exception, SystemExit):
            failed.append(name)
        if after_each is not None:
            after_each(name)
    return failed


def _read_line(conn: socket.socket) -> bytes:
    """A control connection's line, its descriptors (if any) closed unread."""
    line, fds = receive_message(conn, MAX_SPAWN_REQUEST_BYTES)
    close_fds(fds)
    return line


class Template:
    """The fork loop. Children never return into it: they end with os._exit."""

    def __init__(self, listener: socket.socket, status: StatusChannel,
                 handler_class: type | None = None, modules: Iterable[str] = (),
                 adopts_orphans: bool = False) -> None:
        self._listener = listener
        self._status = status
        self._pid = os.getpid()
        self._handler_class = handler_class
        self._modules = list(modules)
        # Whether we are our descendants' subreaper (set_child_subreaper): a restored
        # template's instances can then become our children.
        self._adopts_orphans = adopts_orphans

    def serve_forever(self) -> None:
        if threading.active_count() > 1:
            print(
                f"thaw template: {threading.active_count()} threads running at fork time; "
                "an import started threads, forked instances may deadlock",
                file=sys.stderr,
            )
        answer_forever(self._listener, self._spawn)

    def _spawn(self, conn: socket.socket) -> None:
        conn.settimeout(SPAWN_READ_TIMEOUT_S)
        request: SpawnRequest | BuildRequest
        try:
            request = read_request(conn)
            if isinstance(request, BuildRequest) and self._handler_class is None:
                raise ValueError("this template cannot build: its handler is no class")
        except (ValueError, TimeoutError) as exc:
            conn.sendall(event_to_line(Failed(Stage.SPAWN, describe_exception(exc))))
            return
        conn.settimeout(None)
        # The child reports "ready" on this connection only after we sent "spawned";
        # the pipe is how it waits for that (it reads EOF once we close our end).
        go_read, go_write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(go_read)
            os.close(go_write)
            if isinstance(request, SpawnRequest):
                close_fds(request.fds.values())
            conn.sendall(event_to_line(Failed(Stage.SPAWN, describe_exception(exc))))
            return
        if pid == 0:
            os.close(go_write)
            if isinstance(request, BuildRequest):
                self._run_build_child(request, conn, go_read)
            self._run_child(request, conn, go_read)
        os.close(go_read)
        if isinstance(request, SpawnRequest):
            close_fds(request.fds.values())  # the child has its own copies
        try:
            conn.sendall(event_to_line(Spawned(pid)))
        finally:
            os.close(go_write)

    def _run_build_child(self, request: BuildRequest, conn: socket.socket,
                         go_read: int) -> NoReturn:
        code = ExitCode.SETUP_FAILED
        try:
            self._listener.close()
            if self._status.fd is not None and self._status.fd > 2:
                os.close(self._status.fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.setsid()
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != self._pid:
                os._exit(code)
            assert self._handler_class is not None
            code = _build_in_child(request, self._handler_class, self._modules,
                                   StatusChannel(conn.sendall), go_read)
        except BaseException:
            print_exception()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _run_child(self, request: SpawnRequest, conn: socket.socket, go_read: int) -> NoReturn:
        code: int = ExitCode.RESTORE_FAILED
        try:
            self._listener.close()
            if self._status.fd is not None and self._status.fd > 2:
                os.close(self._status.fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the tenant may wait() on children
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.setsid()
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != self._pid:  # the template died before prctl took effect
                os._exit(code)
            from .restored_template import is_restored_template_request, run_restored_template

            if is_restored_template_request(request):
                code = run_restored_template(request, StatusChannel(conn.sendall), conn,
                                             go_read, self._pid, self._adopts_orphans)
            else:
                code = _restore_and_serve(request, StatusChannel(conn.sendall), conn,
                                          go_read)
        except SystemExit as stop:  # SIGTERM (exit_on_sigterm): the agent's polite stop
            code = stop.code if isinstance(stop.code, int) else code
        except BaseException:
            print_exception()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _reap_children(status: StatusChannel) -> None:
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            status.emit(ChildExited(pid, os.waitstatus_to_exitcode(wait_status)))


def _build_in_child(request: BuildRequest, handler_class: type, modules: list[str],
                    channel: StatusChannel, go_read: int) -> ExitCode:
    """setup() and capture in a child of the template: imports are already done."""
    before = set(sys.modules)
    bundle = Path.cwd()  # the template runs in its bundle; setup() may move elsewhere
    timings: dict[str, float] = {"import": 0.0}
    stage_now = Stage.SETUP
    try:
        redirect_output(request.log)
        secretenv.apply(request.env, request.secrets, before_capture=True)
        started = time.perf_counter()
        handler = create_handler(handler_class)
        timings["setup"] = time.perf_counter() - started
        stage_now = Stage.WARMUP
        started = time.perf_counter()
        if run_warmup(handler, bundle):
            timings["warmup"] = time.perf_counter() - started
        stage_now = Stage.CAPTURE
        new = [name for name in sys.modules if name not in before]
        meta = capture(handler, Path(request.out), modules=modules + new, timings=timings,
                       function_version=request.function_version)
    except CaptureError as exc:
        wait_for_go(go_read)
        channel.emit(Failed(Stage.CAPTURE, exc.reason, exc.attribute_path,
                            refused_schema(handler)))
        return Stage.CAPTURE.exit_code
    except BaseException as exc:  # setup() may even sys.exit(): a failed setup
        print_exception()
        wait_for_go(go_read)
        channel.emit(Failed(stage_now, describe_exception(exc)))
        return stage_now.exit_code
    wait_for_go(go_read)
    channel.emit(Captured(timings, meta.host_size, meta.device_size))
    return ExitCode.OK


def _restore_and_serve(
    request: SpawnRequest, channel: StatusChannel, conn: socket.socket, go_read: int
) -> ExitCode:
    stage = Stage.RESTORE
    try:
        redirect_output(request.log)
        restored = restore_request(request)
        invoker = Invoker(restored.handler)
        stage = Stage.SERVE
        server = bind_server(request.socket, invoker)
    except Exception as exc:
        print_exception()
        wait_for_go(go_read)
        channel.emit(Failed(stage, describe_exception(exc)))
        return stage.exit_code

    def announce() -> None:
        wait_for_go(go_read)
        channel.emit(Ready(os.getpid(), restored.timings))
        conn.close()

    serve_until_stopped(server, announce)
    return ExitCode.OK


def refuse_spawns(listener: socket.socket, unsafe_reason: str) -> NoReturn:
    """A template that initialised CUDA forks nothing: every spawn or build request is
    answered with a failure saying why (the agent starts such instances fresh)."""
    refusal = event_to_line(Failed(
        Stage.SPAWN, f"template is not fork-safe: {unsafe_reason}; "
                     "start the instance in restore mode instead"))
    while True:
        conn, _ = listener.accept()
        try:
            conn.settimeout(SPAWN_READ_TIMEOUT_S)
            _read_line(conn)
            conn.sendall(refusal)
        except (OSError, ValueError):
            pass
        finally:
            conn.close()


def run_template(snapshot_json: int | str, control: str, status: StatusChannel,
                 import_handler: Callable[[], object]) -> ExitCode:
    """Import, announce, fork on request; returns only on SIGTERM/SIGINT.
    `snapshot_json`: a descriptor of the snapshot.json the agent gave (or a path)."""
    set_parent_death_signal(signal.SIGKILL)
    # Reap forked instances as they end and tell the agent how each ended; those of a
    # restored template too, handed to us as orphans.
    adopts_orphans = set_child_subreaper()
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: _reap_children(status))
    exit_on_sigterm()
    # torch.cuda.is_available() then asks NVML rather than initialising CUDA, which
    # would make this template unable to fork (the agent sets it too).
    os.environ.setdefault(NVML_CHECK_ENV, "1")
    watch = CudaInitWatch()
    started = time.perf_counter()
    try:
        meta = SnapshotMeta.load(snapshot_json)
        preimport_modules(meta.modules, watch.after_import)
        handler_class = import_handler()
        watch.after_import(str(getattr(handler_class, "__module__", "")) or "handler")
    except Exception as exc:
        print_exception()
        status.emit(Failed(Stage.IMPORT, describe_exception(exc)))
        return ExitCode.IMPORT_FAILED
    elapsed = time.perf_counter() - started
    return announce_and_serve(
        control, status, elapsed, watch.verdict(), "thaw template: not forking instances",
        lambda listener: Template(listener, status,
                                  handler_class if isinstance(handler_class, type) else None,
                                  meta.modules, adopts_orphans).serve_forever())


def announce_and_serve(control: str, status: StatusChannel, elapsed: float,
                       unsafe_reason: str | None, refusing: str,
                       serve: Callable[[socket.socket], None]) -> ExitCode:
    """The end of a template's (or a zygote's) start, its imports done: bind the
    control socket, say `template_ready`, then fork on request with `serve` (or, where
    `unsafe_reason` says it may not fork, refuse every request, `refusing` in its log)
    until SIGTERM/SIGINT."""
    # Move everything imported so far out of the collector's reach: a collection in a
    # fork would otherwise walk (and write to, so copy) every object imported here,
    # unsharing pages of the whole import graph in each fork.
    gc.collect()
    gc.freeze()
    try:
        listener = bind_control_socket(control)
    except OSError as exc:
        status.emit(Failed(Stage.SERVE, describe_exception(exc)))
        return ExitCode.SERVE_FAILED
    status.emit(TemplateReady(os.getpid(), {"import": elapsed}, fork_safe=unsafe_reason is None,
                              unsafe_reason=unsafe_reason or ""))
    try:
        if unsafe_reason is not None:
            print(f"{refusing}: {unsafe_reason}", file=sys.stderr)
            refuse_spawns(listener, unsafe_reason)
        else:
            serve(listener)
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(control)
    return ExitCode.OK
