"""Host pids of processes in containers, exit codes from the engine, and whether the
agent may limit processes of other uids: what the docker runtime reads from /proc."""

from __future__ import annotations

import contextlib
import os

# Signal deaths come back from the engine as 128+N (the shell convention).
SIGNAL_EXIT_BASE = 128
# Needed to prlimit a process of another uid (the package docstring, "Users").
CAP_SYS_RESOURCE = 24  # <linux/capability.h>


def exit_code_from_engine(status: int) -> int:
    """The engine's StatusCode as subprocess would report it (-N for signal N).
    An `exit(137)` is indistinguishable from SIGKILL here; the runtime's own exit
    codes are all below 128 (events.ExitCode)."""
    if SIGNAL_EXIT_BASE < status < SIGNAL_EXIT_BASE + 65:
        return -(status - SIGNAL_EXIT_BASE)
    return status


def ns_pid(host_pid: int) -> int | None:
    """A process's pid in its innermost PID namespace (last NSpid field)."""
    try:
        with open(f"/proc/{host_pid}/status") as handle:
            for line in handle:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


def _children(host_pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{host_pid}/task"):
            with contextlib.suppress(OSError), \
                    open(f"/proc/{host_pid}/task/{tid}/children") as handle:
                found += [int(p) for p in handle.read().split()]
    return found


def host_pid_of(parent_host_pid: int, child_ns_pid: int) -> int | None:
    """The host pid of a process its parent knows as `child_ns_pid` (a template's
    forked instance): first among the parent's children, then among every process in
    the parent's PID namespace."""
    for child in _children(parent_host_pid):
        if ns_pid(child) == child_ns_pid:
            return child
    try:
        namespace = os.readlink(f"/proc/{parent_host_pid}/ns/pid")
    except OSError:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                continue
        except OSError:
            continue
        if ns_pid(int(entry)) == child_ns_pid:
            return int(entry)
    return None


def can_limit_other_uids() -> bool:
    """Whether this process may set resource limits of processes of other uids (it has
    CAP_SYS_RESOURCE; root usually has, some sandboxes strip it)."""
    try:
        with open("/proc/self/status") as handle:
            caps = next(int(line.split()[1], 16) for line in handle
                        if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(caps >> CAP_SYS_RESOURCE & 1)
