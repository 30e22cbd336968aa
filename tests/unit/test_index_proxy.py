"""The package index proxy on real sockets: only the index hosts, at addresses it may
reach, by CONNECT or an absolute http:// GET; everything else refused with a status."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from thaw.platform.sandbox.index_proxy import (
    Allowance,
    IndexProxy,
    allowance_of,
    split_host_port,
)

PUBLIC = "93.184.215.14"


@pytest.fixture
def folder() -> Iterator[Path]:
    # A short path: a unix socket's must fit 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="proxy-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that answers every byte with itself."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


class Net:
    """An injected resolver and connector: names map to the addresses given, and every
    connection, whatever address was checked, lands on the local test server."""

    def __init__(self, names: dict[str, list[str]], local_port: int) -> None:
        self.names = names
        self.local_port = local_port
        self.resolved: list[str] = []
        self.connected: list[tuple[str, int]] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.resolved.append(host)
        if host not in self.names:
            raise OSError("unknown host")
        return self.names[host]

    async def connect(self, address: str, port: int
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.connected.append((address, port))
        return await asyncio.open_connection("127.0.0.1", self.local_port)


async def serving(folder: Path, allowance: Allowance, net: Net | None = None,
                  **limits: float) -> tuple[IndexProxy, str]:
    kwargs: dict[str, object] = {}
    if net is not None:
        kwargs = {"resolver": net.resolve, "connector": net.connect}
    proxy = IndexProxy(allowance, **kwargs, **limits)  # type: ignore[arg-type]
    path = str(folder / "p.sock")
    await proxy.start(path)
    return proxy, path


async def ask(path: str, request: bytes) -> tuple[bytes, asyncio.StreamReader,
                                                   asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    return head, reader, writer


INDEX = allowance_of(["https://index.example/simple"])


async def test_connect_to_an_index_host_tunnels_to_its_checked_address(
        folder: Path, echo: int) -> None:
    net = Net({"index.example": [PUBLIC]}, echo)
    proxy, path = await serving(folder, INDEX, net)
    try:
        head, reader, writer = await ask(
            path, b"CONNECT index.example:443 HTTP/1.1\r\nHost: index.example:443\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.write(b"hello through the tunnel")
        await writer.drain()
        assert await reader.readexactly(24) == b"hello through the tunnel"
        writer.close()
        assert net.connected == [(PUBLIC, 443)]
        assert not proxy.refusals
    finally:
        await proxy.close()


@pytest.mark.parametrize("request_line", [
    b"CONNECT other.example:443 HTTP/1.1",   # not an index host
    b"CONNECT index.example:22 HTTP/1.1",    # an index host, another port
    b"CONNECT 127.0.0.1:443 HTTP/1.1",       # the node's loopback, by address
    b"GET http://other.example/simple/ HTTP/1.1",
])
async def test_anything_but_an_index_host_is_forbidden_before_any_lookup(
        folder: Path, echo: int, request_line: bytes) -> None:
    net = Net({"index.example": [PUBLIC], "other.example": [PUBLIC]}, echo)
    proxy, path = await serving(folder, INDEX, net)
    try:
        head, reader, _ = await ask(path, request_line + b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 ")
        assert b"not a configured package index" in await reader.read()
        assert net.resolved == [] and net.connected == []
        assert proxy.refusals[-1].startswith("403 ")
    finally:
        await proxy.close()


@pytest.mark.parametrize("addresses", [
    ["10.0.0.7"], ["127.0.0.1"], ["169.254.169.254"], ["::ffff:192.168.1.1"],
    ["224.0.0.1"], ["fe80::1"], ["::1"],
])
async def test_an_index_name_resolving_to_a_private_address_is_refused(
        folder: Path, echo: int, addresses: list[str]) -> None:
    net = Net({"index.example": addresses}, echo)
    proxy, path = await serving(folder, INDEX, net)
    try:
        head, reader, _ = await ask(path, b"CONNECT index.example:443 HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 ")
        assert b"no address the proxy may reach" in await reader.read()
        assert net.connected == []
    finally:
        await proxy.close()


async def test_operator_allowances_reach_named_addresses_and_networks_never_metadata(
        folder: Path, echo: int) -> None:
    allowance = allowance_of(["https://mirror.corp/simple", "http://169.254.169.254/x"],
                             ["10.0.0.0/8", f"127.0.0.1:{echo}"])
    net = Net({"mirror.corp": ["10.1.2.3"], "169.254.169.254": ["169.254.169.254"],
               "127.0.0.1": ["127.0.0.1"]}, echo)
    proxy, path = await serving(folder, allowance, net)
    try:
        head, _, writer = await ask(path, b"CONNECT mirror.corp:443 HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.close()
        head, _, writer = await ask(path, f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n".encode())
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.close()
        head, _, _ = await ask(path, b"GET http://169.254.169.254/x HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 ")
        assert net.connected == [("10.1.2.3", 443), ("127.0.0.1", echo)]
    finally:
        await proxy.close()


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"garbage\r\n\r\n", b"400"),
    (b"CONNECT index.example HTTP/1.1\r\n\r\n", b"400"),
    (b"CONNECT index.example:99999 HTTP/1.1\r\n\r\n", b"400"),
    (b"CONNECT index.example:443 SPDY/9\r\n\r\n", b"400"),
    (b"GET http://index.\xff/ HTTP/1.1\r\n\r\n", b"400"),
    (b"POST http://index.example/ HTTP/1.1\r\n\r\n", b"405"),
    (b"GET /simple/ HTTP/1.1\r\n\r\n", b"405"),
    (b"GET https://index.example/simple/ HTTP/1.1\r\n\r\n", b"405"),
    (b"GET http://user@index.example/ HTTP/1.1\r\n\r\n", b"405"),
    (b"CONNECT index.example:443 HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
])
async def test_malformed_and_unsupported_requests_get_a_status(
        folder: Path, echo: int, request_bytes: bytes, status: bytes) -> None:
    net = Net({"index.example": [PUBLIC]}, echo)
    proxy, path = await serving(folder, INDEX, net)
    try:
        head, _, _ = await ask(path, request_bytes)
        assert head.split(b" ")[1] == status
        assert net.connected == []
    finally:
        await proxy.close()


async def test_a_plain_http_get_is_forwarded_in_origin_form_one_per_connection(
        folder: Path) -> None:
    seen: list[bytes] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    net = Net({"index.example": [PUBLIC]}, port)
    proxy, path = await serving(folder, allowance_of(["http://index.example/simple"]), net)
    try:
        head, reader, _ = await ask(
            path, b"GET http://index.example/simple/pkg/?x=1 HTTP/1.1\r\n"
                  b"Host: index.example\r\nProxy-Authorization: Basic c2VjcmV0\r\n"
                  b"Proxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert await reader.read() == b"ok"
        sent = seen[0].decode()
        assert sent.startswith("GET /simple/pkg/?x=1 HTTP/1.1\r\n")
        assert "Host: index.example" in sent and "Accept: */*" in sent
        assert "Proxy-" not in sent and "Connection: close" in sent
        assert net.connected == [(PUBLIC, 80)]
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()


async def test_an_unresolvable_index_host_is_a_bad_gateway(folder: Path, echo: int) -> None:
    proxy, path = await serving(folder, INDEX, Net({}, echo))
    try:
        head, _, _ = await ask(path, b"CONNECT index.example:443 HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 502 ")
    finally:
        await proxy.close()


async def test_connections_beyond_the_bound_wait_for_a_slot(folder: Path, echo: int) -> None:
    net = Net({"index.example": [PUBLIC]}, echo)
    proxy, path = await serving(folder, INDEX, net, max_connections=1)
    try:
        head, _, first = await ask(path, b"CONNECT index.example:443 HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"CONNECT index.example:443 HTTP/1.1\r\n\r\n")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.3)
        assert len(net.connected) == 1
        first.close()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        assert len(net.connected) == 2
        writer.close()
    finally:
        await proxy.close()


async def test_silent_clients_and_idle_tunnels_are_dropped(folder: Path, echo: int) -> None:
    net = Net({"index.example": [PUBLIC]}, echo)
    proxy, path = await serving(folder, INDEX, net, header_timeout=0.2, idle_timeout=0.2)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"CONNECT index.exa")  # never finished
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ")
        head, reader, writer = await ask(path, b"CONNECT index.example:443 HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await reader.read() == b""  # closed by the proxy, nothing having moved
        writer.close()
    finally:
        await proxy.close()


def test_allowance_of_index_urls_and_operator_entries() -> None:
    allowance = allowance_of(
        ["https://pypi.org/simple", "http://Mirror.Corp.:8080/simple", "file:///srv/wheels",
         "/srv/other"],
        ["files.example", "cdn.example:8443", "[2001:db8::1]:443", "10.0.0.0/8", " "])
    assert allowance.hosts == frozenset({
        ("pypi.org", 443), ("files.pythonhosted.org", 443), ("mirror.corp", 8080),
        ("files.example", 443), ("cdn.example", 8443), ("2001:db8::1", 443)})
    assert [str(n) for n in allowance.networks] == ["10.0.0.0/8"]
    assert allowance.permits("MIRROR.corp", 8080) and not allowance.permits("mirror.corp", 80)
    with pytest.raises(ValueError):
        allowance_of([], ["bad host:1"])
    with pytest.raises(ValueError):
        allowance_of([], ["10.0.0.0/33"])
    assert split_host_port("[::1]", 443) == ("::1", 443)
    with pytest.raises(ValueError):
        split_host_port("host:0", 443)


async def test_an_environment_build_reaches_a_url_index_only_through_the_proxy(
        tmp_path: Path) -> None:
    """Environments hand uv a run with no network, behind the relay; what the proxy
    refused is named in the failed build's reason. A local index gets no relay."""
    from thaw.core.errors import InstanceFailed
    from thaw.platform.environments import Dependencies, node_python
    from thaw.platform.environments_build import Environments, EnvSettings
    from thaw.platform.runtime import ToolRun
    from thaw.platform.sandbox.index_access import RELAY

    runs: list[ToolRun] = []
    answers: list[bytes] = []

    async def run_tool(tool: ToolRun) -> tuple[int, str]:
        runs.append(tool)
        if tool.argv[3] == RELAY:  # what uv would do: ask the proxy for another host
            reader, writer = await asyncio.open_unix_connection(tool.argv[4])
            writer.write(b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
            answers.append(await reader.readuntil(b"\r\n\r\n"))
            writer.close()
        return 1, "network error"

    settings = EnvSettings(index_url="https://mirror.example/simple",
                           index_hosts=("files.example",))
    assert settings.allowance().hosts == {("mirror.example", 443), ("files.example", 443)}
    assert EnvSettings().allowance().hosts == {("pypi.org", 443),
                                               ("files.pythonhosted.org", 443)}
    envs = Environments(tmp_path / "envs", settings, run_tool)
    deps = Dependencies(("thawtiny==1.0",), node_python(), "requirements.txt")
    with pytest.raises(InstanceFailed, match="the index proxy refused: 403 evil.example:443"):
        await envs.resolve(deps, lambda _line: None)
    (tool,) = runs
    assert tool.network == "none"
    assert tool.argv[3] == RELAY and "--index-url" in tool.argv
    assert tool.argv[tool.argv.index("--index-url") + 1] == "https://mirror.example/simple"
    assert os.path.dirname(tool.argv[4]) in tool.read_only
    assert not os.path.exists(tool.argv[4])  # the proxy's folder goes with the run
    assert answers[0].startswith(b"HTTP/1.1 403 ")

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    local = Environments(tmp_path / "envs2", EnvSettings(index_url=str(wheels)), run_tool)
    with pytest.raises(InstanceFailed, match="network error"):
        await local.resolve(deps, lambda _line: None)
    assert runs[-1].network == "none" and RELAY not in runs[-1].argv
