"""What a forking server (a template, a restored template) and the children it forks
share: its control socket, reading a spawn or build request, the parent-death signal,
the child subreaper flag, a child's log redirect and its wait for its parent's "go"."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
from collections.abc import Callable

from .bounded import print_exception
from .events import BuildRequest, SpawnRequest, close_fds, receive_message

# From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# How long a connection may take to send its spawn line. The template serves spawns one
# at a time, so a silent client must not stall it for longer than this.
SPAWN_READ_TIMEOUT_S = 10.0
# A spawn or build line carries the function's [env] and secrets (thaw.toml allows 32
# secrets of up to 64 KiB each, JSON-escaped here): room for all of them.
MAX_SPAWN_REQUEST_BYTES = 16 * 1024 * 1024
CONTROL_BACKLOG = 128


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send `signum` when our parent exits (Linux only; elsewhere the
    supervisor must clean up). Note the kernel ties this to the parent *thread*."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")


def set_child_subreaper() -> bool:
    """Become the reaper of our orphaned descendants (Linux >= 3.4): an instance that a
    restored template forks is handed to us when the short-lived process between them
    exits, so that it is our child like any other instance. False where the kernel
    refuses or this is not Linux."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def bind_control_socket(path: str) -> socket.socket:
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(CONTROL_BACKLOG)
    return listener


def read_request(conn: socket.socket) -> SpawnRequest | BuildRequest:
    """The request on a control connection, with the descriptors a spawn carries;
    ValueError (its descriptors closed) for anything else."""
    line, fds = receive_message(conn, MAX_SPAWN_REQUEST_BYTES)
    try:
        record = json.loads(line) if line.strip() else None
        if isinstance(record, dict) and record.get("op") == BuildRequest.op:
            close_fds(fds)
            fds = []
            return BuildRequest.from_record(record)
        return SpawnRequest.from_message(line, fds)
    except BaseException:
        close_fds(fds)
        raise


def redirect_output(log_path: str) -> None:
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # The log is a file now; line buffering keeps the tenant's prints timely in it.
    for stream in (sys.stdout, sys.stderr):
        reconfigure: Callable[..., None] | None = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)


def wait_for_go(go_read: int) -> None:
    os.read(go_read, 1)
    os.close(go_read)


def answer_forever(listener: socket.socket, answer: Callable[[socket.socket], None]) -> None:
    """The fork loop of a template, a restored template or a zygote: each connection
    on the control socket is one request, answered by `answer` and closed; an OSError
    of one (a caller gone) is printed and the next is taken. Children never return
    into it: they end with os._exit."""
    while True:
        conn, _ = listener.accept()
        try:
            answer(conn)
        except OSError:
            print_exception()
        finally:
            conn.close()
