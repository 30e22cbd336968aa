"""A restore inside a template's container: the template forks the instance, so its
socket and log must be visible there and its pid translated to the host's. The snapshot
and the slice go in as descriptors over the bind-mounted control socket (SCM_RIGHTS
crosses the container boundary), never as files. A restore-mode container (a template
that may not fork) answers the same request in its own main process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from typing import Any

from tenacity import AsyncRetrying, retry_if_result, stop_after_delay, wait_fixed

from thaw.core.errors import DeadlineExceeded, InstanceFailed, SnapshotError
from thaw.platform.docker.containers import _Container, link_log, link_socket
from thaw.platform.docker.pids import host_pid_of, ns_pid
from thaw.platform.process import log_tail, open_request
from thaw.platform.runtime import SpawnRequest

# A template's forked child is found among its processes within this long, looked
# for this often.
PID_LOOKUP_SECONDS = 2.0
PID_LOOKUP_POLL_SECONDS = 0.01


async def spawn_in_container(c: _Container, control_socket: str, request: SpawnRequest,
                             timeout: float) -> tuple[int, dict[str, Any]]:
    """Fork a restored instance from the template in container `c` (or restore in the
    restore-mode container `c` itself): (host pid, ready event)."""
    await asyncio.to_thread(link_instance, c, request)
    reader, writer = await open_request(control_socket, request, timeout)
    host_pid = 0
    try:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except TimeoutError as exc:
                if host_pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(host_pid, signal.SIGKILL)
                raise DeadlineExceeded(
                    f"restore did not finish within {timeout:.0f}s") from exc
            if not line:
                tail = log_tail(request.log)
                raise InstanceFailed("restored instance exited before it was ready"
                                     + (f"; last output:\n{tail}" if tail else ""))
            event = json.loads(line)
            kind = event.get("event")
            if kind == "spawned":
                host_pid = await find_child(c, int(event["pid"]))
            elif kind == "ready":
                if not host_pid:
                    host_pid = await find_child(c, int(event["pid"]))
                if not host_pid:
                    raise InstanceFailed(
                        f"restored instance (pid {event['pid']} in container "
                        f"{c.name}) is not among the container's processes")
                return host_pid, {**event, "pid": host_pid}
            elif kind == "failed":
                raise SnapshotError(f"restore failed: {event.get('reason', 'unknown')}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def link_instance(c: _Container, request: SpawnRequest) -> None:
    """Make a spawn request's socket and log reachable in the template's container, as
    for a launch (blocking)."""
    if request.socket:
        link_socket(c, request.socket)
    if request.log:
        link_log(c, request.log)


async def find_child(c: _Container, child_ns_pid: int) -> int:
    """The host pid of a process the template forked (remembered so its child_exited
    event gets translated too), or of the container's main process itself (a
    restore-mode instance restores without forking)."""
    if c.host_pid and ns_pid(c.host_pid) == child_ns_pid:
        return c.host_pid
    lookup = AsyncRetrying(
        retry=retry_if_result(lambda found: found is None),
        stop=stop_after_delay(PID_LOOKUP_SECONDS), wait=wait_fixed(PID_LOOKUP_POLL_SECONDS),
        retry_error_callback=lambda _state: None)
    host: int | None = await lookup(asyncio.to_thread, host_pid_of, c.host_pid, child_ns_pid)
    if host is None:
        return 0
    c.children[child_ns_pid] = host
    return host

def translate_event(c: _Container, line: bytes) -> bytes:
    """Pids in an event -> host pids (the agent watches and signals host pids)."""
    try:
        event = json.loads(line)
    except ValueError:
        return line
    if not isinstance(event, dict) or "pid" not in event:
        return line
    pid = event["pid"]
    kind = event.get("event")
    if kind == "child_exited":
        host = c.children.pop(pid, None)
        if host is None:
            return line
        event["pid"] = host
    elif kind in ("ready", "template_ready") and c.host_pid and ns_pid(c.host_pid) == pid:
        event["pid"] = c.host_pid
    else:
        return line
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"
