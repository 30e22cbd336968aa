"""Tenancy in the store, on SQLite and PostgreSQL: keys kept as SHA-256 only, expiry,
revocation, quotas, public functions, and an audit log that only grows."""

from __future__ import annotations

import hashlib
import time

import pytest
from sqlalchemy import select

from thaw.core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    Unauthenticated,
)
from thaw.core.spec import FunctionSpec
from thaw.scheduler import models, tenancy
from thaw.scheduler.pools import FunctionPool, InstanceView
from thaw.scheduler.states import FunctionState
from thaw.scheduler.store import Store

GiB = 1024**3


def test_a_key_is_stored_as_its_sha256_only(store: Store) -> None:
    tenancy.create_tenant(store, "acme")
    info, key = tenancy.create_key(store, "acme", ["invoke", "deploy"], name="ci")
    assert key.startswith("thaw_") and len(key) > 40
    assert info.scopes == ("invoke", "deploy") and info.tenant == "acme"
    with store._session() as s:
        row = s.get(models.ApiKey, info.id)
        assert row is not None
        assert row.key_sha256 == hashlib.sha256(key.encode()).hexdigest()
        stored = [str(v) for v in (row.id, row.name, row.scopes, row.key_sha256)]
    assert all(key not in v for v in stored)
    listed = tenancy.list_keys(store, "acme")
    assert [k.id for k in listed] == [info.id]
    assert key not in repr(listed)
    # The digest authenticates; the store never needed the key again.
    assert store.authenticate(hashlib.sha256(key.encode()).hexdigest()).tenant == "acme"


def test_keys_need_a_tenant_and_known_scopes(store: Store) -> None:
    with pytest.raises(NotFound):
        tenancy.create_key(store, "nobody", ["invoke"])
    tenancy.create_tenant(store, "acme")
    with pytest.raises(AlreadyExists):
        tenancy.create_tenant(store, "acme")
    with pytest.raises(InvalidArgument) as err:
        tenancy.create_key(store, "acme", ["invoke", "root"])
    assert err.value.field == "scopes"
    with pytest.raises(InvalidArgument):
        tenancy.create_key(store, "acme", [])
    with pytest.raises(InvalidArgument) as err:
        tenancy.create_key(store, "acme", ["invoke"], expires_at=time.time() - 1)
    assert err.value.field == "expires_at"
    with pytest.raises(InvalidArgument):
        tenancy.create_tenant(store, "Bad Name")


def test_an_expired_key_is_refused(store: Store) -> None:
    tenancy.create_tenant(store, "acme")
    now = time.time()
    info, key = tenancy.create_key(store, "acme", ["invoke"], expires_at=now + 0.5, now=now)
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert store.authenticate(digest).expires_at == pytest.approx(now + 0.5)
    with store._session() as s, s.begin():  # time passes: move the expiry behind us
        row = s.get(models.ApiKey, info.id)
        assert row is not None
        row.expires_at = now - 1
    with pytest.raises(Unauthenticated, match="expired"):
        store.authenticate(digest)


def test_a_revoked_key_is_refused_and_revoking_is_per_tenant(store: Store) -> None:
    tenancy.create_tenant(store, "acme")
    tenancy.create_tenant(store, "other")
    info, key = tenancy.create_key(store, "acme", ["admin"])
    digest = hashlib.sha256(key.encode()).hexdigest()
    with pytest.raises(NotFound):  # another tenant cannot revoke (nor learn of) it
        tenancy.revoke_key(store, "other", info.id)
    assert store.authenticate(digest).id == info.id
    first = tenancy.revoke_key(store, "acme", info.id, now=100.0)
    assert first.revoked_at == 100.0
    assert tenancy.revoke_key(store, "acme", info.id, now=200.0).revoked_at == 100.0
    with pytest.raises(Unauthenticated):
        store.authenticate(digest)


def test_quotas_are_set_and_cleared(store: Store) -> None:
    tenancy.create_tenant(store, "acme")
    t = tenancy.set_quota(store, "acme", 4 * GiB, 3)
    assert (t.max_memory_bytes, t.max_instances) == (4 * GiB, 3)
    assert tenancy.get_tenant(store, "acme").max_instances == 3
    t = tenancy.set_quota(store, "acme", None, None)
    assert (t.max_memory_bytes, t.max_instances) == (None, None)
    with pytest.raises(NotFound):
        tenancy.set_quota(store, "nobody", 1, 1)
    with pytest.raises(InvalidArgument):
        tenancy.set_quota(store, "acme", -1, None)
    assert [x.id for x in tenancy.list_tenants(store)] == ["acme"]


def test_functions_are_private_until_made_public(store: Store) -> None:
    spec = FunctionSpec.from_dict({"name": "echo", "handler": "app:Echo"})
    store.upsert_function("acme", spec, "d" * 64, "fresh", FunctionState.READY)
    assert not tenancy.function_is_public(store, "acme", "echo")
    assert tenancy.set_function_public(store, "acme", "echo", True)
    assert tenancy.function_is_public(store, "acme", "echo")
    assert not tenancy.function_is_public(store, "other", "echo")
    assert not tenancy.function_is_public(store, "acme", "nothing")
    with pytest.raises(NotFound):
        tenancy.set_function_public(store, "other", "echo", True)


def test_the_audit_log_only_grows(store: Store) -> None:
    entries = [tenancy.AuditEntry(tenant="acme", action=a, outcome=o, key_id="key_1",
                                  target="echo", source="127.0.0.1", status=s,
                                  time=1000.0 + i)
               for i, (a, o, s) in enumerate([("function.deploy", "ok", 201),
                                              ("function.delete", "denied", 403),
                                              ("key.create", "ok", 201)])]
    ids = tenancy.append_audit(store, entries)
    assert ids == sorted(ids) and len(set(ids)) == 3
    tenancy.append_audit(store, [tenancy.AuditEntry(tenant="other", action="key.revoke",
                                                    outcome="ok", time=1010.0)])
    listed = tenancy.list_audit(store, "acme")
    assert [e.action for e in listed] == ["key.create", "function.delete", "function.deploy"]
    assert len(tenancy.list_audit(store)) == 4
    assert [e.action for e in tenancy.list_audit(store, "acme", action="function.")] == [
        "function.delete", "function.deploy"]
    assert [e.id for e in tenancy.list_audit(store, "acme", from_time=1000.5,
                                             to_time=1001.5)] == [ids[1]]
    assert [e.id for e in tenancy.list_audit(store, "acme", limit=1, before_id=ids[2])] == [
        ids[1]]
    # Nothing in the module updates or deletes an entry.
    assert not [n for n in dir(tenancy) if "audit" in n.lower()
                and any(w in n.lower() for w in ("update", "delete", "remove", "clear"))]
    with pytest.raises(InvalidArgument):
        tenancy.append_audit(store, [tenancy.AuditEntry(tenant="a", action="x",
                                                        outcome="maybe")])
    with pytest.raises(InvalidArgument):
        tenancy.list_audit(store, limit=0)
    with store._session() as s:
        assert len(s.scalars(select(models.AuditRecord)).all()) == 4


def _pool(tenant: str, name: str, *sizes: int) -> FunctionPool:
    pool = FunctionPool(f"fn_{name}", name=f"{tenant}/{name}")
    for i, size in enumerate(sizes):
        pool.instances[f"i{name}{i}"] = InstanceView(
            id=f"i{name}{i}", function_id=pool.function_id, version=1, node_id="n",
            start="fresh", gpu_memory=size)
    return pool


async def test_the_quota_ledger_counts_live_instances_and_starts_in_flight(
        store: Store) -> None:
    tenancy.create_tenant(store, "acme")
    ledger = tenancy.QuotaLedger(store)
    pools = [_pool("acme", "a", GiB), _pool("acme-2", "b", GiB, GiB, GiB)]
    await ledger.claim("acme", "new1", GiB, pools)  # no quota: anything goes
    ledger.release("new1")
    tenancy.set_quota(store, "acme", None, 2)
    ledger.forget_tenant("acme")
    await ledger.claim("acme", "new1", GiB, pools)  # 1 live + this one
    with pytest.raises(QuotaExceeded) as err:  # 1 live + 1 starting + this one
        await ledger.claim("acme", "new2", GiB, pools)
    assert err.value.code == "quota_exceeded" and err.value.retry_after > 0
    ledger.release("new1")
    tenancy.set_quota(store, "acme", 3 * GiB, None)
    ledger.forget_tenant("acme")
    await ledger.claim("acme", "new1", 2 * GiB, pools)
    with pytest.raises(QuotaExceeded, match="slice memory"):
        await ledger.claim("acme", "new2", 1, pools)
    # Another tenant's instances ("acme-2/…" is not "acme/…") count for it only.
    await ledger.claim("acme-2", "new3", 100 * GiB, pools)
