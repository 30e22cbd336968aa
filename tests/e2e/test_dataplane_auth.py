"""The node's HTTP data plane of a running platform (`thaw up`'s services) takes only
mutual TLS from the gateway: on every route, a plaintext client, a TLS client without
a certificate and one whose certificate another CA signed get no answer at all (the
handshake fails before any route), another component's certificate gets 403, and the
gateway's is served; the gateway itself reaches it with its own certificate (the
invocation path and function logs)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES, RunningPlatform
from tests.tls import platform_identity
from thaw.core.http1 import NodeClient, NodeConnectionError
from thaw.core.httptls import DATA_PLANE_CALLERS, client_ssl_context, server_name
from thaw.core.pki import AGENT, COMPONENTS, GATEWAY, PKI_FOLDER, SCHEDULER, ensure_pki

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def node(platform: RunningPlatform) -> tuple[str, str]:
    """(the node's data URL, a READY instance of the sleep fixture on it)."""
    assert platform.deploy(FIXTURES / "sleep").json()["state"] == "ready"
    reply = platform.invoke("sleep", {"seconds": 0})
    assert reply.status_code == 200, reply.text
    data_url = platform.http.get("/v1/nodes").json()["nodes"][0]["data_url"]
    return data_url, reply.headers["X-Thaw-Instance"]


def routes(instance: str) -> list[tuple[str, str]]:
    """(method, path) of every route the data plane serves."""
    return [("POST", f"/v1/instances/{instance}/invoke"),
            ("POST", f"/v1/instances/{instance}/invoke/sub/path"),
            ("GET", "/v1/instances"),
            ("GET", "/logs?function=dev/sleep"),
            ("GET", "/healthz"),
            ("GET", "/metrics")]


def call(client: httpx.Client, base: str, method: str, path: str) -> httpx.Response:
    return client.request(method, f"{base}{path}", json={"seconds": 0} if method == "POST"
                          else None)


def _strangers(home: Path, foreign: Path) -> Iterator[tuple[str, str, httpx.Client]]:
    """(who, scheme, client) for each caller the handshake must refuse."""
    ensure_pki(foreign)
    ca = (home / PKI_FOLDER / "ca.crt").read_text()
    yield "plaintext", "http", httpx.Client(timeout=TIMEOUT)
    bare = ssl.create_default_context(cadata=ca)
    yield "no client certificate", "https", httpx.Client(verify=bare, timeout=TIMEOUT)
    # Trusts both CAs, so only the data plane's refusal of the foreign certificate
    # can fail it.
    other = ssl.create_default_context(cadata=ca + (foreign / "ca.crt").read_text())
    other.load_cert_chain(foreign / "gateway.crt", foreign / "gateway.key")
    yield "another CA", "https", httpx.Client(verify=other, timeout=TIMEOUT)


def test_the_node_advertises_an_https_data_plane(node: tuple[str, str]) -> None:
    assert node[0].startswith("https://127.0.0.1:")


def test_no_route_answers_a_caller_without_a_platform_certificate(
        platform: RunningPlatform, node: tuple[str, str],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    data_url, instance = node
    address = data_url.removeprefix("https://")
    foreign = tmp_path_factory.mktemp("foreign") / "pki"
    for who, scheme, client in _strangers(platform.platform.home, foreign):
        with client:
            for method, path in routes(instance):
                try:
                    answer = call(client, f"{scheme}://{address}", method, path)
                except httpx.TransportError:
                    continue  # refused at the handshake: no route was reached
                pytest.fail(f"{who} got {answer.status_code} from {method} {path}: "
                            f"{answer.text[:200]}")


def test_another_components_certificate_gets_403_on_every_route(
        platform: RunningPlatform, node: tuple[str, str]) -> None:
    data_url, instance = node
    home = platform.platform.home
    served = {}
    for component in COMPONENTS:
        context = client_ssl_context(platform_identity(home, component))
        with httpx.Client(verify=context, timeout=TIMEOUT) as client:
            statuses = {path: call(client, data_url, method, path).status_code
                        for method, path in routes(instance)}
        if component in DATA_PLANE_CALLERS:
            served[component] = statuses
        else:
            assert set(statuses.values()) == {403}, (component, statuses)
    # The gateway is served: its call reaches the instance, the sub-path route its 404
    # or the handler's answer, every read route 200.
    assert set(served) == {GATEWAY}
    gateway = served[GATEWAY]
    assert gateway[f"/v1/instances/{instance}/invoke"] == 200
    assert all(gateway[path] == 200 for method, path in routes(instance) if method == "GET")
    assert gateway[f"/v1/instances/{instance}/invoke/sub/path"] != 403


def test_the_gateways_client_accepts_only_an_agent(
        platform: RunningPlatform, node: tuple[str, str]) -> None:
    data_url, instance = node
    context = client_ssl_context(platform_identity(platform.platform.home, GATEWAY))

    async def post(server_hostname: str, url: str) -> int:
        client = NodeClient(5.0, tls=context, server_hostname=server_hostname)
        try:
            answer = await client.post(url, b'{"seconds": 0}',
                                       {"Content-Type": "application/json"})
            await answer.read()
            return answer.status
        finally:
            await client.close()

    url = f"{data_url}/v1/instances/{instance}/invoke"
    assert asyncio.run(post(server_name(AGENT), url)) == 200
    # The agent's certificate is the platform's, but not the scheduler's: a client
    # that meant the scheduler refuses it, whatever the address.
    with pytest.raises(NodeConnectionError):
        asyncio.run(post(server_name(SCHEDULER), url))
    # Never plaintext where TLS is configured.
    with pytest.raises(NodeConnectionError, match="https"):
        asyncio.run(post(server_name(AGENT), url.replace("https://", "http://")))


def test_invocations_and_logs_still_go_through_the_gateway(
        platform: RunningPlatform) -> None:
    assert platform.deploy(FIXTURES / "prints").status_code == 201
    tag = "over-mutual-tls"
    reply = platform.http.post("/fn/dev/prints", json={"tag": tag})
    assert reply.status_code == 200 and reply.json() == {"tag": tag}, reply.text
    # The gateway reads the node's logs over the data plane: its lines arrive (a node
    # that refused the gateway would leave them out).
    lines: list[str] = []
    for _ in range(50):
        logs = platform.http.get("/v1/functions/prints/logs", params={"tail": "100"})
        assert logs.status_code == 200, logs.text
        lines = [json.loads(ln)["line"] for ln in logs.text.splitlines() if ln]
        if any(f"hello {tag}" in ln for ln in lines):
            break
        time.sleep(0.1)
    assert any(f"hello {tag}" in ln for ln in lines), lines
