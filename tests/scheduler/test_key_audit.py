"""Keys the scheduler makes are on the audit log (scheduler/key_audit.py): the
development key once, at its bootstrap; a key made over gRPC, by whom its certificate
says (or "unverified" without internal TLS); a key whose entry cannot be written is
revoked and the call fails. (Keys made over gRPC, HTTP and the CLI on a running
platform: tests/e2e/test_internal_auth.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from thaw.core.config import SchedulerConfig
from thaw.core.errors import InvalidArgument, Unauthenticated, Unavailable
from thaw.proto import tenancy_pb2, tenancy_pb2_grpc
from thaw.scheduler import key_audit, tenancy
from thaw.scheduler.server import SchedulerServer, ensure_dev_key
from thaw.scheduler.store import Store, hash_key


def test_the_development_key_is_recorded_once_at_its_bootstrap(store: Store,
                                                               tmp_path: Path) -> None:
    path = tmp_path / "dev-key"
    key = ensure_dev_key(store, path)
    principal = store.authenticate(hash_key(key))
    (entry,) = tenancy.list_audit(store, "dev", action="key.issue")
    assert (entry.tenant, entry.target, entry.outcome) == ("dev", principal.id, "ok")
    detail = json.loads(entry.detail)
    assert detail["caller"] == key_audit.BOOTSTRAP and detail["name"] == "development key"
    assert set(detail["scopes"]) == set(principal.scopes)
    assert str(path) in entry.source and key not in entry.detail
    # Kept in its file, it is not made (nor recorded) again.
    assert ensure_dev_key(store, path) == key
    assert len(tenancy.list_audit(store, "dev", action="key.issue")) == 1


def test_a_key_that_cannot_be_recorded_is_revoked(store: Store,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    tenancy.create_tenant(store, "acme")
    info, key = tenancy.create_key(store, "acme", ["admin"], name="x")

    def refuse(store: Store, entries: list[tenancy.AuditEntry]) -> list[int]:
        raise Unavailable("metadata DB error: disk full")

    monkeypatch.setattr(key_audit, "append_audit", refuse)
    entry = key_audit.issue_entry("acme", info.id, scopes=["admin"], name="x",
                                  caller="gateway", source="ipv4:127.0.0.1:5000")
    with pytest.raises(Unavailable):
        key_audit.record_issue(store, entry)
    with pytest.raises(Unauthenticated):
        store.authenticate(hash_key(key))
    assert tenancy.list_keys(store, "acme")[0].revoked_at is not None


async def test_a_scheduler_without_certificates_does_not_start(tmp_path: Path) -> None:
    server = SchedulerServer(SchedulerConfig(home=tmp_path, scheduler_listen="127.0.0.1:0"))
    with pytest.raises(InvalidArgument, match="thaw pki init"):
        await server.start()
    assert server.port == 0 and not (tmp_path / "scheduler").exists()


async def test_without_internal_tls_a_grpc_key_is_recorded_as_unverified(
        tmp_path: Path) -> None:
    server = SchedulerServer(SchedulerConfig(home=tmp_path, scheduler_listen="127.0.0.1:0",
                                             insecure_internal=True))
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = tenancy_pb2_grpc.TenancyStub(channel)
        await stub.CreateTenant(tenancy_pb2.CreateTenantRequest(id="acme"), timeout=10)
        reply = await stub.CreateKey(tenancy_pb2.CreateKeyRequest(
            tenant="acme", name="direct", scopes=["invoke"]), timeout=10)
        assert server.store is not None
        (entry,) = tenancy.list_audit(server.store, "acme", action="key.issue")
    finally:
        await channel.close()
        await server.stop()
    assert entry.target == reply.info.id and entry.source.startswith("ipv4:127.0.0.1:")
    assert json.loads(entry.detail) == {"caller": key_audit.UNVERIFIED_CALLER,
                                        "scopes": ["invoke"], "name": "direct"}
