"""A restored template: a process forked from a function's template that restored one
snapshot's host state once (unpickled the handler over the mapped host arena) and forks
warm instances of that snapshot, so that each extra instance costs only the pages it
writes (copy-on-write) and restores nothing.

It stays as fork-safe as its template: it serves nothing, starts no thread (its restore
prefaults nothing: each instance does), runs no torch op and no on_restore (each
instance's own, after the fork); it seeds the random generators once, only to warm what
seeding caches (each instance reseeds its own), and moves the rebuilt graph out of the
collector's reach (gc.freeze) so an instance's collections do not copy its pages. A
snapshot with a device arena is refused: its storages would be views into one
instance's slice (a CUDA IPC mapping on cuda, which no fork carries), so such snapshots
restore as before, on every backend alike.

It is asked for like an instance: a spawn request to the template whose env names
RESTORED_TEMPLATE_ROLE (`restored_template_request`), whose `socket` is the control
socket it then listens on and whose `log` is its own. It answers "ready" once it
listens. Its own control protocol is the template's (one spawn per connection:
{"op":"spawn",...} + descriptors; it answers "spawned", the instance "ready" or
"failed"); a request for another snapshot is refused.

Process tree: the restored template forks a short-lived child that forks the instance
and exits at once, so the instance is handed to the template (a child subreaper,
`set_child_subreaper`) and is its child like any instance it forks: the template reaps
it and reports its exit status to the agent (`child_exited`), its parent-death signal
is tied to the template, and it outlives the restored template (stopping or losing that
one never ends a serving instance).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import NoReturn

from .bounded import print_exception
from .events import (
    BuildRequest,
    ExitCode,
    Failed,
    Ready,
    Spawned,
    SpawnRequest,
    Stage,
    StatusChannel,
    close_fds,
    describe_exception,
    event_to_line,
)
from .handler import Invoker
from .restore import (
    RestoreError,
    Unpickled,
    reseed_generators,
    restore_forked,
    unpickle_snapshot,
)
from .server import bind_server, exit_on_sigterm, serve_until_stopped
from .snapshot import SnapshotMeta, read_descriptor
from .spawning import (
    SPAWN_READ_TIMEOUT_S,
    answer_forever,
    bind_control_socket,
    read_request,
    redirect_output,
    set_parent_death_signal,
    wait_for_go,
)

RESTORED_TEMPLATE_ROLE_ENV = "THAW_SPAWN_ROLE"
"""Names, in a spawn request's env, what the forked child becomes."""
RESTORED_TEMPLATE_ROLE = "restored-template"
# What `ps` and /proc/PID/comm show for a restored template (15 bytes at most: the
# kernel's TASK_COMM_LEN); benches find its memory by this name.
RESTORED_TEMPLATE_COMM = "thaw-restored"
# From <linux/prctl.h>.
PR_SET_NAME = 15
# The spawn request's descriptors a restored template needs (the snapshot's, never an
# instance's slice).
SNAPSHOT_FD_NAMES = ("snapshot_json", "pickle", "host_arena")


def restored_template_request(*, control: str, log: str, name: str,
                              fds: Mapping[str, int]) -> SpawnRequest:
    """The spawn request that has a template fork a restored template of the snapshot
    whose descriptors `fds` holds (an instance's spawn descriptors will do: its slice
    is left out), listening on `control`."""
    return SpawnRequest(instance_id=name, socket=control, log=log,
                        fds={k: v for k, v in fds.items() if k in SNAPSHOT_FD_NAMES},
                        env={RESTORED_TEMPLATE_ROLE_ENV: RESTORED_TEMPLATE_ROLE})


def is_restored_template_request(request: SpawnRequest) -> bool:
    return request.env.get(RESTORED_TEMPLATE_ROLE_ENV) == RESTORED_TEMPLATE_ROLE


def _set_comm(name: str) -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _comm() -> str:
    try:
        with open("/proc/self/comm", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


class RestoredTemplate:
    """The fork loop of a restored template. Instances never return into it: they end
    with os._exit."""

    def __init__(self, listener: socket.socket, state: Unpickled, snapshot_json: bytes,
                 template_pid: int, instance_comm: str) -> None:
        self._listener = listener
        self._state = state
        self._snapshot_json = snapshot_json
        self._template_pid = template_pid
        self._instance_comm = instance_comm

    def serve_forever(self) -> None:
        if threading.active_count() > 1:
            print(f"thaw restored template: {threading.active_count()} threads running at "
                  "fork time; forked instances may deadlock", file=sys.stderr)
        answer_forever(self._listener, self._spawn)

    def _read(self, conn: socket.socket) -> SpawnRequest:
        request = read_request(conn)
        if isinstance(request, BuildRequest):
            raise ValueError("a restored template does not build")
        try:
            if is_restored_template_request(request):
                raise ValueError("a restored template does not fork restored templates")
            if read_descriptor(request.fds["snapshot_json"]) != self._snapshot_json:
                raise ValueError("the spawn request is for another snapshot")
        except BaseException:
            close_fds(request.fds.values())
            raise
        return request

    def _spawn(self, conn: socket.socket) -> None:
        conn.settimeout(SPAWN_READ_TIMEOUT_S)
        try:
            request = self._read(conn)
        except (ValueError, TimeoutError) as exc:
            conn.sendall(event_to_line(Failed(Stage.SPAWN, describe_exception(exc))))
            return
        conn.settimeout(None)
        # The instance waits for EOF on `go` (every write end closed: the middle child's
        # at its start, ours once "spawned" is sent): by then the middle child has been
        # reaped, so the instance is already the template's child.
        go_read, go_write = os.pipe()
        pid_read, pid_write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            middle = os.fork()
        except OSError as exc:
            close_fds([go_read, go_write, pid_read, pid_write, *request.fds.values()])
            conn.sendall(event_to_line(Failed(Stage.SPAWN, describe_exception(exc))))
            return
        if middle == 0:
            self._run_middle(request, conn, go_read, go_write, pid_read, pid_write)
        close_fds([go_read, pid_write, *request.fds.values()])
        try:
            answer = _read_all(pid_read)
        finally:
            os.close(pid_read)
            os.waitpid(middle, 0)
        try:
            if not answer:
                conn.sendall(event_to_line(Failed(
                    Stage.SPAWN, "the restored template could not fork the instance")))
                return
            conn.sendall(event_to_line(Spawned(int(answer))))
        finally:
            os.close(go_write)

    def _run_middle(self, request: SpawnRequest, conn: socket.socket, go_read: int,
                    go_write: int, pid_read: int, pid_write: int) -> NoReturn:
        """Fork the instance, tell its pid, exit: the instance is orphaned to the
        template."""
        code = 1
        try:
            close_fds([go_write, pid_read])
            instance = os.fork()
            if instance == 0:
                os.close(pid_write)
                self._run_instance(request, conn, go_read)
            os.write(pid_write, str(instance).encode())
            code = 0
        except BaseException:
            print_exception()
        finally:
            os._exit(code)

    def _run_instance(self, request: SpawnRequest, conn: socket.socket,
                      go_read: int) -> NoReturn:
        code: int = ExitCode.RESTORE_FAILED
        try:
            self._listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the tenant may wait() on children
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.setsid()
            _set_comm(self._instance_comm)
            wait_for_go(go_read)
            # Only now: tied to the middle child, the signal would come at its exit.
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != self._template_pid:  # no subreaper, or the template died
                print("thaw restored template: the forked instance is not the template's "
                      "child", file=sys.stderr)
                os._exit(code)
            code = _serve_forked(request, self._state, StatusChannel(conn.sendall), conn)
        except SystemExit as stop:  # SIGTERM (exit_on_sigterm): the agent's polite stop
            code = stop.code if isinstance(stop.code, int) else code
        except BaseException:
            print_exception()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _read_all(fd: int) -> bytes:
    parts = []
    while part := os.read(fd, 64):
        parts.append(part)
    return b"".join(parts)


def _serve_forked(request: SpawnRequest, state: Unpickled, channel: StatusChannel,
                  conn: socket.socket) -> ExitCode:
    """An instance's own part of the restore, then serve; like the template's
    _restore_and_serve with the restore already done."""
    stage = Stage.RESTORE
    try:
        redirect_output(request.log)
        restored = restore_forked(request, state)
        invoker = Invoker(restored.handler)
        stage = Stage.SERVE
        server = bind_server(request.socket, invoker)
    except Exception as exc:
        print_exception()
        channel.emit(Failed(stage, describe_exception(exc)))
        return stage.exit_code

    def announce() -> None:
        channel.emit(Ready(os.getpid(), restored.timings))
        conn.close()

    serve_until_stopped(server, announce)
    return ExitCode.OK


def _restore_state(request: SpawnRequest) -> tuple[Unpickled, bytes]:
    """The snapshot's host state and its snapshot.json; the request's descriptors
    closed (the arena's mapping stays)."""
    try:
        snapshot_json = read_descriptor(request.fds["snapshot_json"])
        meta = SnapshotMeta.load(request.fds["snapshot_json"])
        if meta.device_size:
            raise RestoreError(
                f"the snapshot has a {meta.device_size}-byte device arena: its storages "
                "are views into one instance's slice, so its instances restore one by one")
        # No prefault here: fork copies no page table of a mapping the template never
        # wrote, so each instance faults the arena in for itself; the template's own
        # pass would only add its time to every cold start's wait.
        return unpickle_snapshot(meta, request.fds["pickle"], request.fd("host_arena"),
                                 prefault=False), snapshot_json
    finally:
        close_fds(request.fds.values())


def run_restored_template(request: SpawnRequest, channel: StatusChannel,
                          conn: socket.socket, go_read: int, template_pid: int,
                          adopts_orphans: bool) -> ExitCode:
    """In a child of the template: restore the snapshot's host state, listen on the
    request's socket, announce "ready" on `conn`, fork instances until SIGTERM."""
    stage = Stage.RESTORE
    try:
        redirect_output(request.log)
        if not adopts_orphans:
            raise RestoreError("the template cannot adopt the instances a restored "
                               "template forks (no child subreaper here)")
        started = time.perf_counter()
        state, snapshot_json = _restore_state(request)
        # Each instance reseeds its own generators after the fork. Seeding once here
        # too only fills what that leaves cached: torch's manual_seed records the stack
        # of its lazy per-device seeding (traceback.format_stack reads the source file
        # of every frame into linecache), which every fork would otherwise read again
        # (about 10 ms of each forked start).
        reseed_generators()
        # What restoring left behind is garbage now or never: collect once and freeze
        # the rest, so instances' collections do not walk (and copy) the shared graph.
        gc.collect()
        gc.freeze()
        timings = {**state.timings, "restore": time.perf_counter() - started}
        stage = Stage.SERVE
        listener = bind_control_socket(request.socket)
    except Exception as exc:
        print_exception()
        wait_for_go(go_read)
        channel.emit(Failed(stage, describe_exception(exc)))
        return stage.exit_code
    instance_comm = _comm()
    _set_comm(RESTORED_TEMPLATE_COMM)
    try:
        exit_on_sigterm()  # before "ready": the agent may stop it the moment it hears it
        wait_for_go(go_read)
        channel.emit(Ready(os.getpid(), timings))
        conn.close()
        RestoredTemplate(listener, state, snapshot_json, template_pid,
                         instance_comm).serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(request.socket)
    return ExitCode.OK
