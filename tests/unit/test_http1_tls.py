"""Mutual TLS on the invocation path's HTTP hop (core/httptls.py with
core/http1server.py and core/http1.py), in-process on port 0: the client keeps its
TLS connection (one handshake for many calls), the server serves only the components
it names, and each end checks the other's certificate and name."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.tls import platform_identity
from thaw.core.errors import InvalidArgument
from thaw.core.http1 import NodeClient, NodeConnectionError
from thaw.core.http1server import HTTPServer, Request, Response, Router
from thaw.core.httptls import (
    client_ssl_context,
    local_client_context,
    server_name,
    server_ssl_context,
)
from thaw.core.pki import AGENT, GATEWAY, PKI_FOLDER, SCHEDULER, ensure_pki
from thaw.platform.dataplane import DataPlane


async def _echo(request: Request) -> Response:
    return Response(200, request.body, {"Content-Type": "application/octet-stream"})


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    ensure_pki(tmp_path / PKI_FOLDER)
    return tmp_path


async def _serving(home: Path, callers: frozenset[str] | None
                   ) -> tuple[HTTPServer, str]:
    router = Router()
    router.add("POST", "/echo", _echo)
    server = HTTPServer(router, tls=server_ssl_context(platform_identity(home, AGENT)),
                        callers=callers)
    port = await server.start("127.0.0.1", 0)
    return server, f"https://127.0.0.1:{port}/echo"


def _client(home: Path, component: str, peer: str = AGENT) -> NodeClient:
    return NodeClient(5.0, tls=client_ssl_context(platform_identity(home, component)),
                      server_hostname=server_name(peer))


async def _post(client: NodeClient, url: str, body: bytes) -> tuple[int, bytes]:
    answer = await client.post(url, body, {})
    return answer.status, await answer.read()


@pytest.fixture()
async def served(home: Path) -> AsyncIterator[tuple[HTTPServer, str]]:
    server, url = await _serving(home, frozenset({GATEWAY}))
    yield server, url
    await server.close(grace=0)


async def test_calls_share_one_tls_connection(home: Path,
                                              served: tuple[HTTPServer, str]) -> None:
    server, url = served
    client = _client(home, GATEWAY)
    try:
        for i in range(5):
            assert await _post(client, url, b"x" * i * 1000) == (200, b"x" * i * 1000)
        # One connection, kept: the handshake was paid once, not per call.
        assert len(server._connections) == 1
        large = bytes(range(256)) * 4096  # past the single-write size, both ways
        assert await _post(client, url, large) == (200, large)
        assert len(server._connections) == 1
    finally:
        await client.close()


async def test_another_component_gets_403_and_the_route_is_not_run(
        home: Path, served: tuple[HTTPServer, str]) -> None:
    _, url = served
    for component in (SCHEDULER, AGENT):
        client = _client(home, component)
        try:
            status, body = await _post(client, url, b"secret")
        finally:
            await client.close()
        assert status == 403
        assert b"secret" not in body and b"gateway" in body


async def test_a_client_without_a_platform_certificate_is_refused(
        home: Path, tmp_path_factory: pytest.TempPathFactory,
        served: tuple[HTTPServer, str]) -> None:
    _, url = served
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    ca = (home / PKI_FOLDER / "ca.crt").read_text()
    foreign = tmp_path_factory.mktemp("foreign") / PKI_FOLDER
    ensure_pki(foreign)
    bare = ssl.create_default_context(cadata=ca)
    other = ssl.create_default_context(cadata=ca)
    other.load_cert_chain(foreign / "gateway.crt", foreign / "gateway.key")
    for context in (None, bare, other):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context,
            server_hostname=server_name(AGENT) if context else None)
        try:
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
            await writer.drain()
            answer = await reader.read(1024)
        except (ssl.SSLError, ConnectionError):
            answer = b""
        finally:
            writer.close()
        assert not answer.startswith(b"HTTP/"), (context, answer)


async def test_the_client_checks_the_servers_name_and_scheme(
        home: Path, served: tuple[HTTPServer, str]) -> None:
    _, url = served
    client = _client(home, GATEWAY, peer=SCHEDULER)
    try:
        with pytest.raises(NodeConnectionError):
            await _post(client, url, b"")
    finally:
        await client.close()
    client = _client(home, GATEWAY)
    try:
        with pytest.raises(NodeConnectionError, match="https"):
            await _post(client, url.replace("https", "http"), b"")
    finally:
        await client.close()
    with pytest.raises(NodeConnectionError, match="http"):
        await NodeClient().post(url, b"", {})


def test_callers_need_tls(home: Path) -> None:
    with pytest.raises(ValueError, match="tls"):
        HTTPServer(Router(), callers=frozenset({GATEWAY}))
    with pytest.raises(ValueError, match="server_hostname"):
        NodeClient(tls=client_ssl_context(platform_identity(home, GATEWAY)))


def test_a_local_context_is_none_without_a_pki(tmp_path: Path, home: Path) -> None:
    assert local_client_context(tmp_path / "nothing") is None
    assert isinstance(local_client_context(home), ssl.SSLContext)


def _stand_in_agent() -> object:
    return SimpleNamespace(instances={}, node_id="node",
                           telemetry=SimpleNamespace(latest=None),
                           logs=SimpleNamespace(close=lambda: None))


async def test_a_plaintext_data_plane_listens_on_loopback_only(home: Path) -> None:
    plain = DataPlane(_stand_in_agent(), None)  # type: ignore[arg-type]
    assert plain.scheme == "http"
    with pytest.raises(InvalidArgument) as refused:
        await plain.start("0.0.0.0", 0)
    assert refused.value.field == "insecure_internal"
    secure = DataPlane(_stand_in_agent(), platform_identity(home, AGENT))  # type: ignore[arg-type]
    assert secure.scheme == "https"
    assert secure.server.tls is not None and secure.server.callers == frozenset({GATEWAY})
