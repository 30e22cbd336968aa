"""The platform CA and the components' certificates (core/pki.py): made once with safe
modes, reused, renewed when they must be; loading checks whose certificate it is; the
table of who may call what covers every method; a service without certificates does
not start; `thaw pki`."""

from __future__ import annotations

import datetime
import ipaddress
import json
import stat
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509

from tests.tls import every_method
from thaw.core import pki
from thaw.core.config import AgentConfig, GatewayConfig, SchedulerConfig
from thaw.core.errors import InvalidArgument
from thaw.ops.cli import cli


def cert_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def hosts_of(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))}


def identity(folder: Path, component: str) -> pki.Identity:
    paths = pki.PkiPaths(folder)
    return pki.load_identity(component, paths.ca_cert, paths.cert(component),
                             paths.key(component))


def test_the_ca_and_a_certificate_per_component_private_files(tmp_path: Path) -> None:
    folder = tmp_path / "pki"
    paths = pki.ensure_pki(folder, hosts=["sched.example", "10.1.2.3"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert files == ["agent.crt", "agent.key", "ca.crt", "ca.key", "gateway.crt",
                     "gateway.key", "scheduler.crt", "scheduler.key"]
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    ca = cert_of(paths.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for component in pki.COMPONENTS:
        cert = cert_of(paths.cert(component))
        cert.verify_directly_issued_by(ca)
        assert cert.subject.rfc4514_string().startswith(f"CN=thaw-{component}")
        assert hosts_of(cert) == {f"thaw-{component}", "localhost", "127.0.0.1", "::1",
                                  "sched.example", "10.1.2.3"}
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        # Kept apart from the CA: a component's key is not the CA's.
        assert paths.key(component).read_bytes() != paths.ca_key.read_bytes()
    ips = cert_of(paths.cert("agent")).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("::1") in ips


def test_made_once_and_reused_then_renewed_only_where_needed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "pki"
    pki.ensure_pki(folder)
    before = {p.name: p.read_bytes() for p in folder.glob("*.*")}
    pki.ensure_pki(folder)
    assert {p.name: p.read_bytes() for p in folder.glob("*.*")} == before
    # A new host: every component certificate is issued again, the CA stays.
    pki.ensure_pki(folder, hosts=["node-7"])
    after = {p.name: p.read_bytes() for p in folder.glob("*.*")}
    assert after["ca.crt"] == before["ca.crt"] and after["ca.key"] == before["ca.key"]
    assert after["agent.crt"] != before["agent.crt"]
    assert "node-7" in hosts_of(cert_of(folder / "agent.crt"))
    # A certificate near its end is renewed by the next ensure (`thaw up`).
    monkeypatch.setattr(pki, "LEAF_DAYS", pki.RENEW_BEFORE_DAYS - 1)
    (folder / "gateway.crt").unlink()
    pki.ensure_pki(folder, hosts=["node-7"])
    short = cert_of(folder / "gateway.crt")
    monkeypatch.setattr(pki, "LEAF_DAYS", 825)
    pki.ensure_pki(folder, hosts=["node-7"])
    renewed = cert_of(folder / "gateway.crt")
    assert renewed.not_valid_after_utc > short.not_valid_after_utc + datetime.timedelta(
        days=700)
    assert (folder / "agent.crt").read_bytes() == after["agent.crt"]


def test_certificates_of_another_ca_are_issued_again(tmp_path: Path) -> None:
    folder = tmp_path / "pki"
    pki.ensure_pki(folder)
    pki.ensure_pki(tmp_path / "other")
    (folder / "agent.crt").write_bytes((tmp_path / "other" / "agent.crt").read_bytes())
    pki.ensure_pki(folder)
    cert_of(folder / "agent.crt").verify_directly_issued_by(cert_of(folder / "ca.crt"))
    identity(folder, "agent")  # matches its key again


def test_a_ca_certificate_without_its_key_issues_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "pki"
    pki.ensure_pki(folder)
    (folder / "ca.key").unlink()
    (folder / "agent.crt").unlink()
    with pytest.raises(InvalidArgument, match="ca.key") as err:
        pki.ensure_pki(folder)
    assert err.value.field == "dir"


def test_loading_checks_whose_certificate_it_is(tmp_path: Path) -> None:
    folder, other = tmp_path / "pki", tmp_path / "other"
    pki.ensure_pki(folder)
    pki.ensure_pki(other)
    paths = pki.PkiPaths(folder)
    gateway = identity(folder, "gateway")
    assert gateway.component == "gateway" and gateway.ca == paths.ca_cert.read_bytes()
    with pytest.raises(InvalidArgument, match="thaw-scheduler's certificate, not "
                                              "thaw-gateway's") as err:
        pki.load_identity("gateway", paths.ca_cert, paths.cert("scheduler"),
                          paths.key("scheduler"))
    assert err.value.field == "tls_cert"
    with pytest.raises(InvalidArgument, match="not signed by the CA") as err:
        pki.load_identity("gateway", paths.ca_cert, other / "gateway.crt",
                          other / "gateway.key")
    assert err.value.field == "tls_cert"
    with pytest.raises(InvalidArgument, match="is not the key of") as err:
        pki.load_identity("gateway", paths.ca_cert, paths.cert("gateway"),
                          paths.key("agent"))
    assert err.value.field == "tls_key"
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(InvalidArgument) as err:
        pki.load_identity("gateway", tmp_path / "junk.pem", paths.cert("gateway"),
                          paths.key("gateway"))
    assert err.value.field == "tls_ca"


def test_a_service_without_certificates_does_not_start(tmp_path: Path) -> None:
    config = SchedulerConfig(home=tmp_path)
    with pytest.raises(InvalidArgument, match="thaw pki init") as err:
        pki.internal_identity(config, "scheduler")
    assert err.value.field == "tls_ca" and str(tmp_path / "pki") in err.value.message
    # The files `thaw up` makes under the home are found without any setting.
    pki.ensure_pki(tmp_path / "pki")
    found = pki.internal_identity(config, "scheduler")
    assert found is not None and found.component == "scheduler"
    # Set explicitly (a Kubernetes Secret's mount), each file is read from there.
    mount = tmp_path / "mount"
    mount.mkdir()
    for name, source in (("ca.crt", "ca.crt"), ("tls.crt", "agent.crt"),
                         ("tls.key", "agent.key")):
        (mount / name).write_bytes((tmp_path / "pki" / source).read_bytes())
    agent = AgentConfig(home=tmp_path / "elsewhere", tls_ca=mount / "ca.crt",
                        tls_cert=mount / "tls.crt", tls_key=mount / "tls.key")
    loaded = pki.internal_identity(agent, "agent")
    assert loaded is not None and loaded.cert == (mount / "tls.crt").read_bytes()
    # Another component's files are refused.
    with pytest.raises(InvalidArgument, match="not thaw-gateway's"):
        pki.internal_identity(GatewayConfig.load(
            home=tmp_path, tls_cert=mount / "tls.crt", tls_key=mount / "tls.key"),
            "gateway")


def test_the_opt_out_is_explicit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert SchedulerConfig(home=tmp_path).insecure_internal is False
    monkeypatch.setenv("THAW_INSECURE_INTERNAL", "true")
    assert pki.internal_identity(AgentConfig.load(home=tmp_path), "agent") is None


def test_every_method_has_its_callers_and_nothing_else_is_callable() -> None:
    methods = [path for path, _streams in every_method()]
    assert {m.rsplit("/", 1)[0] for m in methods} == {
        "/thaw.v1.Scheduler", "/thaw.v1.NodeRegistry", "/thaw.v1.Tenancy",
        "/thaw.v1.Invocations", "/thaw.v1.Metering", "/thaw.v1.Agent", "/thaw.v1.Images",
        "/thaw.v1.Volumes", "/thaw.v1.Secrets"}
    for method in methods:
        assert pki.allowed_callers(method), f"{method} is callable by no component"
    assert pki.allowed_callers("/thaw.v1.Tenancy/CreateKey") == {"gateway"}
    assert pki.allowed_callers("/thaw.v1.NodeRegistry/Register") == {"agent"}
    assert pki.allowed_callers("/thaw.v1.Agent/StartInstance") == {"scheduler"}
    assert pki.allowed_callers("/thaw.v1.Agent/FetchChunks") == {"agent"}
    assert pki.allowed_callers("/thaw.v1.Images/Upload") == {"gateway"}
    assert pki.allowed_callers("/thaw.v1.Images/Fetch") == {"agent"}
    assert pki.allowed_callers("/thaw.v1.Volumes/PutBlob") == {"gateway"}
    assert pki.allowed_callers("/thaw.v1.Volumes/GetBlob") == {"agent"}
    assert pki.allowed_callers("/grpc.health.v1.Health/Check") == set(pki.COMPONENTS)
    assert pki.allowed_callers("/thaw.v1.Unknown/Method") == frozenset()
    assert pki.allowed_callers("/grpc.reflection.v1.ServerReflection/Info") == frozenset()
    # A name that is no component's is no caller.
    assert pki.component_of("thaw-tenant") is None and pki.component_of("agent") is None


def test_hosts_are_names_or_addresses() -> None:
    assert pki.check_host(" node-1.example ") == "node-1.example"
    assert pki.check_host("fd00::1") == "fd00::1"
    for bad in ("", "http://x", "a b", "user@host", "host:7070"):
        with pytest.raises(InvalidArgument) as err:
            pki.check_host(bad)
        assert err.value.field == "host"


def test_thaw_pki_init_issue_show(tmp_path: Path) -> None:
    runner = CliRunner()
    folder = tmp_path / "k8s-pki"
    made = runner.invoke(cli, ["pki", "init", "--dir", str(folder), "--host",
                               "thaw-scheduler.thaw.svc"])
    assert made.exit_code == 0, made.output
    assert str(folder / "scheduler.crt") in made.output
    issued = runner.invoke(cli, ["pki", "issue", "agent", "gpu-3", "--dir", str(folder),
                                 "--host", "gpu-3"])
    assert issued.exit_code == 0, issued.output
    extra = pki.load_identity("agent", folder / "ca.crt", folder / "gpu-3.crt",
                              folder / "gpu-3.key")
    assert "gpu-3" in hosts_of(x509.load_pem_x509_certificate(extra.cert))
    shown = runner.invoke(cli, ["pki", "show", "--dir", str(folder), "--json"])
    assert shown.exit_code == 0, shown.output
    rows = {r["name"]: r for r in json.loads(shown.output)}
    assert set(rows) == {"ca", "agent", "gateway", "scheduler", "gpu-3"}
    assert rows["gpu-3"]["component"] == "agent" and rows["gpu-3"]["from_ca"] is True
    assert "thaw-scheduler.thaw.svc" in rows["scheduler"]["hosts"]
    refused = runner.invoke(cli, ["pki", "issue", "agent", "../x", "--dir", str(folder)])
    assert refused.exit_code != 0
    none = runner.invoke(cli, ["pki", "issue", "agent", "n1", "--dir", str(tmp_path / "x")])
    assert none.exit_code != 0 and "thaw pki init" in str(none.exception or none.output)


async def test_a_plaintext_call_to_a_checked_server_is_unauthenticated(
        tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from thaw.core.grpcutil import add_health, internal_server, mark_serving

    pki.ensure_pki(tmp_path)
    server = internal_server(identity(tmp_path, "scheduler"))
    servicer = add_health(server)
    port = server.add_insecure_port("127.0.0.1:0")  # never done by thaw: a misconfiguration
    await server.start()
    await mark_serving(servicer)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channel.close()
        await server.stop(None)


async def test_the_opt_out_listens_on_loopback_only() -> None:
    from thaw.core.grpcutil import add_secure_port, internal_server, is_loopback

    assert is_loopback("127.0.0.1:0") and is_loopback("[::1]:7070")
    assert is_loopback("localhost:7070")
    assert not is_loopback("0.0.0.0:7070") and not is_loopback("10.0.0.5:7070")
    assert not is_loopback("[::]:7070") and not is_loopback("sched.example:7070")
    server = internal_server(None)
    try:
        with pytest.raises(InvalidArgument, match="loopback only") as err:
            add_secure_port(server, "0.0.0.0:0", None)
        assert err.value.field == "insecure_internal"
        assert add_secure_port(server, "127.0.0.1:0", None) > 0
    finally:
        await server.stop(None)
