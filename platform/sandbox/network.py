"""Egress for a sandbox that asks for it (thaw.toml `[runtime] network = "egress"`).

The sandbox still gets a network namespace of its own; slirp4netns (user-mode TCP/IP,
Debian's slirp4netns) then gives it a tap device whose traffic leaves through ordinary
sockets of the agent's namespace, so the instance reaches what the node can reach. With
`--disable-host-loopback` the gateway address does not lead to the node's loopback,
where the platform's ports listen; the instance's own 127.0.0.1 is its own. The
launcher waits in its new namespace until the agent has connected it (a byte each way
on a socket pair), so the instance never starts without the network it asked for."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket

from thaw.core.errors import InstanceFailed

# The sandbox's side: a virtual network of slirp4netns, outside the private ranges the
# node's own networks may use. The gateway is .2, the DNS forwarder .3, the instance .100.
EGRESS_CIDR = "100.64.0.0/24"
EGRESS_DNS = "100.64.0.3"
# How long the agent waits for a launcher to make its namespace, and for slirp4netns.
CONNECT_TIMEOUT_SECONDS = 30.0


def slirp4netns() -> str:
    """The slirp4netns program; InstanceFailed when the node has none."""
    found = shutil.which("slirp4netns")
    if found is None:
        raise InstanceFailed('runtime.network = "egress" needs slirp4netns on the node '
                             "(Debian: apt-get install slirp4netns)")
    return found


async def connect(pid: int, sync: socket.socket, log_fd: int,
                  timeout: float = CONNECT_TIMEOUT_SECONDS) -> asyncio.subprocess.Process:
    """Once the launcher `pid` says its namespace is made (a byte on `sync`), attach
    slirp4netns to it (its messages to `log_fd`, the instance's log), wait until the
    tap is up, and let the launcher go on. Returns slirp4netns's process, which the
    caller stops when the sandbox ends."""
    program = slirp4netns()
    loop = asyncio.get_running_loop()
    sync.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            made = await loop.sock_recv(sync, 1)
    except TimeoutError as exc:
        raise InstanceFailed("the sandbox did not make its network namespace in time") from exc
    if made != b"n":
        raise InstanceFailed("the sandbox exited before its network was connected")
    ready_r, ready_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            program, "--configure", "--mtu=65520", "--disable-host-loopback",
            f"--cidr={EGRESS_CIDR}", f"--ready-fd={ready_w}", str(pid), "tap0",
            stdin=asyncio.subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            pass_fds=(ready_w,), start_new_session=True)
    finally:
        os.close(ready_w)
    try:
        async with asyncio.timeout(timeout):
            ready = await asyncio.to_thread(os.read, ready_r, 1)
        if ready != b"1":
            raise InstanceFailed("slirp4netns could not connect the sandbox (its reason "
                                 "is in the instance's log)")
        await loop.sock_sendall(sync, b"g")
    except BaseException:
        await stop(proc)
        raise
    finally:
        os.close(ready_r)
    return proc


async def stop(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
