"""Internal gRPC of a running platform (`thaw up`'s services) takes only mutual TLS
from the platform's own components: every method of every service, on the scheduler
and on the agent, refuses a plaintext caller, a caller without a certificate and one
whose certificate another CA signed (the handshake fails: UNAVAILABLE), and a
component that may not call it (PERMISSION_DENIED). Every key made, by any path, is on
the audit log."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import RunningPlatform
from tests.tls import client_streaming, every_method, sync_channel
from thaw.core.grpcutil import channel_options
from thaw.core.pki import COMPONENTS, PKI_FOLDER, allowed_callers, ensure_pki
from thaw.proto import scheduler_pb2, scheduler_pb2_grpc, tenancy_pb2, tenancy_pb2_grpc

CALL_TIMEOUT = 10.0
SCHEDULER_SERVICES = ("/thaw.v1.Scheduler/", "/thaw.v1.NodeRegistry/", "/thaw.v1.Tenancy/",
                      "/thaw.v1.Invocations/", "/thaw.v1.Metering/", "/thaw.v1.Images/",
                      "/thaw.v1.Secrets/", "/thaw.v1.Volumes/")
HEALTH = "/grpc.health.v1.Health/Check"


def status_of(channel: grpc.Channel, path: str, streams: bool) -> grpc.StatusCode:
    """Call `path` with an empty request (a valid message of every type); its status."""
    try:
        if path in client_streaming():
            channel.stream_unary(path)(iter([b""]), timeout=CALL_TIMEOUT)
        elif streams:
            for _message in channel.unary_stream(path)(b"", timeout=CALL_TIMEOUT):
                pass
        else:
            channel.unary_unary(path)(b"", timeout=CALL_TIMEOUT)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        return code
    return grpc.StatusCode.OK


def methods_of(server: str) -> list[tuple[str, bool]]:
    """Every method the scheduler or the agent serves, health included."""
    thaw = [(path, streams) for path, streams in every_method()
            if path.startswith(SCHEDULER_SERVICES) == (server == "scheduler")]
    return [*thaw, (HEALTH, False)]


@pytest.fixture(scope="module")
def addresses(platform: RunningPlatform) -> dict[str, str]:
    """The scheduler's and the agent's gRPC addresses."""
    channel = sync_channel(platform.platform.scheduler_address, platform.platform.home,
                           "scheduler")
    try:
        nodes = scheduler_pb2_grpc.SchedulerStub(channel).ListNodes(
            scheduler_pb2.ListNodesRequest(), timeout=CALL_TIMEOUT).nodes
    finally:
        channel.close()
    return {"scheduler": platform.platform.scheduler_address,
            "agent": nodes[0].control_address}


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another platform's CA and certificates, every component's name in them."""
    return tmp_path_factory.mktemp("foreign") / "pki"


def _strangers(home: Path, foreign: Path, address: str, peer: str
               ) -> Iterator[tuple[str, grpc.Channel]]:
    ensure_pki(foreign)
    ca = (home / PKI_FOLDER / "ca.crt").read_bytes()
    yield "plaintext", grpc.insecure_channel(address)
    # TLS that trusts the platform's CA but shows no certificate of its own.
    yield "no client certificate", grpc.secure_channel(
        address, grpc.ssl_channel_credentials(root_certificates=ca), channel_options(peer))
    # A gateway certificate of another CA (its server check trusts both CAs, so only
    # the platform's refusal of the foreign certificate can fail it).
    yield "another CA", grpc.secure_channel(address, grpc.ssl_channel_credentials(
        root_certificates=ca + (foreign / "ca.crt").read_bytes(),
        private_key=(foreign / "gateway.key").read_bytes(),
        certificate_chain=(foreign / "gateway.crt").read_bytes()), channel_options(peer))


@pytest.mark.parametrize("server", ["scheduler", "agent"])
def test_no_method_answers_a_caller_without_a_platform_certificate(
        platform: RunningPlatform, addresses: dict[str, str], foreign_pki: Path,
        server: str) -> None:
    methods = methods_of(server)
    assert len(methods) > (30 if server == "scheduler" else 10)
    for who, channel in _strangers(platform.platform.home, foreign_pki, addresses[server],
                                   server):
        try:
            got = {path: status_of(channel, path, streams) for path, streams in methods}
        finally:
            channel.close()
        # The handshake refuses them: no call reaches a servicer.
        wrong = {p: c for p, c in got.items() if c != grpc.StatusCode.UNAVAILABLE}
        assert not wrong, f"{who} on the {server}: {wrong}"


@pytest.mark.parametrize("server", ["scheduler", "agent"])
def test_a_component_calls_only_the_methods_it_may(
        platform: RunningPlatform, addresses: dict[str, str], server: str) -> None:
    home = platform.platform.home
    refused: dict[str, list[str]] = {}
    for component in COMPONENTS:
        channel = sync_channel(addresses[server], home, server, as_component=component)
        try:
            for path, streams in methods_of(server):
                if component in allowed_callers(path):
                    continue
                code = status_of(channel, path, streams)
                assert code == grpc.StatusCode.PERMISSION_DENIED, (component, path, code)
                refused.setdefault(component, []).append(path)
            assert status_of(channel, HEALTH, False) == grpc.StatusCode.OK
        finally:
            channel.close()
    # The cases the table exists for.
    if server == "scheduler":
        assert "/thaw.v1.Tenancy/CreateKey" in refused["agent"]
        assert "/thaw.v1.NodeRegistry/Register" in refused["gateway"]
    else:
        assert "/thaw.v1.Agent/StartInstance" in refused["agent"]
        assert "/thaw.v1.Agent/FetchChunks" in refused["gateway"]
        assert "/thaw.v1.Agent/FetchChunks" not in refused["agent"]


def test_a_client_accepts_only_the_component_it_meant(
        platform: RunningPlatform, addresses: dict[str, str]) -> None:
    # The agent's certificate is the platform's, but not the scheduler's: a client
    # that meant the scheduler refuses it, whatever the address.
    channel = sync_channel(addresses["agent"], platform.platform.home, "scheduler")
    try:
        assert status_of(channel, HEALTH, False) == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()


def test_thaw_up_made_the_certificates_private(platform: RunningPlatform) -> None:
    folder = platform.platform.home / PKI_FOLDER
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("ca.crt", "ca.key", *(f"{c}.{e}" for c in COMPONENTS for e in ("crt", "key"))):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name


# ---- every key made is on the audit log ------------------------------------------------

def _issued(platform: RunningPlatform, key_id: str) -> list[dict[str, Any]]:
    resp = platform.http.get("/v1/audit", params={"action": "key.issue", "limit": 1000})
    assert resp.status_code == 200, resp.text
    return [e for e in resp.json()["entries"] if e["target"] == key_id]


def _created(platform: RunningPlatform, key_id: str) -> list[dict[str, Any]]:
    resp = platform.http.get("/v1/audit", params={"action": "key.create", "limit": 1000})
    assert resp.status_code == 200, resp.text
    return [e for e in resp.json()["entries"] if e["target"] == key_id]


def test_the_development_key_is_on_record(platform: RunningPlatform) -> None:
    keys = platform.http.get("/v1/keys").json()["keys"]
    dev = [k for k in keys if k["name"] == "development key"]
    assert len(dev) == 1
    (entry,) = _issued(platform, dev[0]["id"])
    assert entry["tenant"] == "dev" and entry["outcome"] == "ok"
    assert entry["detail"]["caller"] == "bootstrap"
    assert "admin" in entry["detail"]["scopes"]
    assert platform.key not in json.dumps(entry)


def test_a_key_made_over_http_is_on_record_twice(platform: RunningPlatform) -> None:
    made = platform.http.post("/v1/keys", json={"name": "http", "scopes": ["invoke"]})
    assert made.status_code == 201, made.text
    key_id = made.json()["id"]
    (issued,) = _issued(platform, key_id)
    assert issued["detail"] == {"caller": "gateway", "scopes": ["invoke"], "name": "http"}
    assert issued["source"].startswith(("ipv4:", "ipv6:"))
    # The gateway's entry says which key asked.
    (created,) = _created(platform, key_id)
    assert created["key_id"] and created["outcome"] == "ok"


def test_a_key_made_with_the_cli_is_on_record(platform: RunningPlatform,
                                              tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "THAW_HOME": str(tmp_path / "no-home"), "THAW_URL": platform.url,
           "THAW_API_KEY": platform.key, "THAW_CONFIG_FILE": str(tmp_path / "absent.toml")}
    result = subprocess.run([sys.executable, "-m", "thaw.ops", "key", "create", "--name",
                             "cli", "--scope", "invoke"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    key_id = result.stdout.split("key id:", 1)[1].split()[0]
    (issued,) = _issued(platform, key_id)
    assert issued["detail"]["caller"] == "gateway" and issued["detail"]["name"] == "cli"
    assert len(_created(platform, key_id)) == 1


def test_a_key_made_by_grpc_is_on_record_and_only_the_gateway_may(
        platform: RunningPlatform) -> None:
    home = platform.platform.home
    request = tenancy_pb2.CreateKeyRequest(tenant="dev", name="grpc", scopes=["admin"])
    agent = sync_channel(platform.platform.scheduler_address, home, "scheduler",
                         as_component="agent")
    before = len(platform.http.get("/v1/keys").json()["keys"])
    try:
        with pytest.raises(grpc.RpcError) as err:
            tenancy_pb2_grpc.TenancyStub(agent).CreateKey(request, timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    finally:
        agent.close()
    assert len(platform.http.get("/v1/keys").json()["keys"]) == before
    gateway = sync_channel(platform.platform.scheduler_address, home, "scheduler")
    try:
        reply = tenancy_pb2_grpc.TenancyStub(gateway).CreateKey(request, timeout=CALL_TIMEOUT)
    finally:
        gateway.close()
    (issued,) = _issued(platform, reply.info.id)
    assert issued["detail"] == {"caller": "gateway", "scopes": ["admin"], "name": "grpc"}
    assert reply.key not in json.dumps(issued)
