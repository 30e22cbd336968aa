"""The store's part of two tenancy features, on SQLite and PostgreSQL: the revocation
feed every gateway polls (keys revoked since a cursor, with overlap), and audit entries
of the operator acting on another tenant, which that tenant's listing shows."""

from __future__ import annotations

from thaw.scheduler import tenancy
from thaw.scheduler.store import Store

NOW = 2_000_000_000.0


def test_revoked_keys_since_a_cursor(store: Store) -> None:
    tenancy.create_tenant(store, "acme")
    old, _ = tenancy.create_key(store, "acme", ["invoke"], now=NOW - 1000)
    recent, _ = tenancy.create_key(store, "acme", ["invoke"], now=NOW - 1000)
    live, _ = tenancy.create_key(store, "acme", ["invoke"], now=NOW - 1000)
    tenancy.revoke_key(store, "acme", old.id, now=NOW - 600)
    tenancy.revoke_key(store, "acme", recent.id, now=NOW - 10)
    # A first call: only what an auth cache could still hold (the recent window).
    first, cursor = tenancy.revoked_keys_since(store, 0.0, now=NOW)
    assert first == [recent.id] and cursor == NOW
    # Nothing new: the overlap repeats what was revoked just before the cursor only.
    again, cursor = tenancy.revoked_keys_since(store, cursor, now=NOW + 1)
    assert again == [] and cursor == NOW + 1
    tenancy.revoke_key(store, "acme", live.id, now=NOW + 1.5)
    found, _ = tenancy.revoked_keys_since(store, cursor, now=NOW + 2)
    assert found == [live.id]
    # A revocation stamped just before the cursor (its commit came late) is still
    # found, within the overlap.
    late, _ = tenancy.create_key(store, "acme", ["invoke"], now=NOW - 1000)
    tenancy.revoke_key(store, "acme", late.id,
                       now=NOW + 2 - tenancy.REVOCATION_OVERLAP_SECONDS / 2)
    assert late.id in tenancy.revoked_keys_since(store, NOW + 2, now=NOW + 3)[0]


def test_the_operators_actions_on_a_tenant_are_listed_for_it(store: Store) -> None:
    ids = tenancy.append_audit(store, [
        tenancy.AuditEntry(tenant="acme", actor_tenant="dev", key_id="key_op",
                           action="tenant.quota", outcome="ok", status=200),
        tenancy.AuditEntry(tenant="acme", key_id="key_acme", action="key.create",
                           outcome="ok", status=201),
        tenancy.AuditEntry(tenant="dev", actor_tenant="dev", key_id="key_op",
                           action="node.drain", outcome="ok", status=200),
        tenancy.AuditEntry(tenant="other", actor_tenant="dev", key_id="key_op",
                           action="key.create", outcome="ok", status=201)])
    acme = tenancy.list_audit(store, "acme")
    assert [e.id for e in acme] == [ids[1], ids[0]]
    assert (acme[1].actor_tenant, acme[1].key_id) == ("dev", "key_op")
    assert acme[0].actor_tenant == "acme"  # its own key: actor = the tenant
    # The operator's tenant lists what happened to it and what its keys did elsewhere.
    assert {e.id for e in tenancy.list_audit(store, "dev")} == {ids[0], ids[2], ids[3]}
    assert len(tenancy.list_audit(store, "")) == 4
