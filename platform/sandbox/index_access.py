"""A node tool run that reaches the package indexes and nothing else.

`index_access` starts an IndexProxy (index_proxy.py) on a unix socket in a folder of
its own, owned by the tool's uid and closed to everyone else, and rewrites the tool's
run: network "none" (the sandbox's own loopback only), the socket's folder and the
relay bound in, and the program started by relay.py, which gives it HTTP(S)_PROXY on
that loopback. What the tool may reach is decided outside its sandbox, by the proxy:
the index hosts, by name and port, at globally routable addresses unless the operator
named the address. docs/environments.md, "Security"; docs/isolation.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from thaw.platform.runtime import ToolRun
from thaw.platform.sandbox.index_proxy import (
    Allowance,
    Connector,
    IndexProxy,
    Resolver,
    open_tcp,
    system_resolver,
)
from thaw.platform.sandbox.plan import python_paths

RELAY = str(Path(__file__).with_name("relay.py"))
SOCKET_NAME = "index.sock"
# A unix socket's path must fit sockaddr_un (108 bytes with its NUL).
_MAX_SOCKET_PATH = 100


def _socket_folder(uid: int) -> str:
    """A new folder for the socket: 0700, owned by `uid` (where the agent is root)."""
    base = tempfile.gettempdir()
    if len(os.path.join(base, "thaw-index-12345678", SOCKET_NAME)) > _MAX_SOCKET_PATH:
        base = "/tmp"
    folder = tempfile.mkdtemp(prefix="thaw-index-", dir=base)
    if os.geteuid() == 0:
        os.chown(folder, uid, uid)
    os.chmod(folder, 0o700)
    return folder


def relayed(tool: ToolRun, socket_path: str) -> ToolRun:
    """`tool` run behind relay.py: no network but the relay's, which leads to
    `socket_path`."""
    folder = os.path.dirname(socket_path)
    interpreter = python_paths(sys.executable)
    return dataclasses.replace(
        tool, network="none",
        argv=(sys.executable, "-I", "-S", RELAY, socket_path, *tool.argv),
        read_only=(*tool.read_only, *interpreter, RELAY, folder))


@contextlib.asynccontextmanager
async def index_access(tool: ToolRun, allowance: Allowance, *,
                       resolver: Resolver = system_resolver,
                       connector: Connector = open_tcp
                       ) -> AsyncIterator[tuple[ToolRun, IndexProxy]]:
    """The proxy serving while the block runs, and `tool` rewritten to use it only."""
    folder = await asyncio.to_thread(_socket_folder, tool.uid)
    path = os.path.join(folder, SOCKET_NAME)
    proxy = IndexProxy(allowance, resolver=resolver, connector=connector)
    try:
        await proxy.start(path)
        if os.geteuid() == 0:
            os.chown(path, tool.uid, tool.uid)
        os.chmod(path, 0o600)
        yield relayed(tool, path), proxy
    finally:
        await proxy.close()
        await asyncio.to_thread(shutil.rmtree, folder, True)
