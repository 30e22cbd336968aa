"""The metadata DB through Store, on SQLite and on PostgreSQL (issue 5, item 6):
migrations from empty, then functions, snapshots, keys, nodes and instances."""

from __future__ import annotations

import hashlib
import time

import pytest
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from thaw.core.errors import NotFound, Unauthenticated
from thaw.core.spec import FunctionSpec, Scaling
from thaw.scheduler.db import alembic_config, make_engine, upgrade
from thaw.scheduler.states import FunctionState, IllegalTransition, SnapshotState
from thaw.scheduler.store import Store

TABLES = {"tenants", "api_keys", "functions", "snapshots", "nodes", "instances"}


def spec(name: str = "echo", **scaling: int) -> FunctionSpec:
    return FunctionSpec(name=name, handler="app:Echo", scaling=Scaling(**scaling))


def test_migrations_upgrade_an_empty_database_to_head(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert not TABLES & set(inspect(engine).get_table_names())
        upgrade(engine)
        assert set(inspect(engine).get_table_names()) >= TABLES
        upgrade(engine)  # idempotent: a restarted scheduler upgrades again
        head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head
        columns = {c["name"] for c in inspect(engine).get_columns("instances")}
        assert {"function_id", "node_id", "version", "start_kind", "ended_at"} <= columns
    finally:
        engine.dispose()


def test_keys_are_stored_hashed_and_authenticate(store: Store) -> None:
    key_id, key = store.create_key("acme", scopes=("invoke",), name="ci")
    assert key.startswith("thaw_") and store.key_exists(key)
    assert not store.key_exists(key + "x")
    record = store.authenticate(hashlib.sha256(key.encode()).hexdigest())
    assert (record.id, record.tenant, record.scopes) == (key_id, "acme", ("invoke",))
    with pytest.raises(Unauthenticated, match="unknown"):
        store.authenticate(hashlib.sha256(b"nope").hexdigest())
    _old_id, old = store.create_key("acme", expires_at=time.time() - 1)
    with pytest.raises(Unauthenticated, match="expired"):
        store.authenticate(hashlib.sha256(old.encode()).hexdigest())


def test_functions_version_list_and_delete(store: Store) -> None:
    first = store.upsert_function("dev", spec(min_instances=1), "a" * 64, "restore",
                                  FunctionState.BUILDING)
    assert (first.version, first.state, first.spec.scaling.min_instances) == (
        1, FunctionState.BUILDING, 1)
    ready = store.set_function_state(first.id, 1, FunctionState.READY, "", "fresh")
    assert ready is not None and ready.start_mode == "fresh"
    second = store.upsert_function("dev", spec(), "b" * 64, "fresh", FunctionState.READY)
    assert second.id == first.id and second.version == 2 and second.bundle_digest == "b" * 64
    # A late update for the replaced version changes nothing.
    assert store.set_function_state(first.id, 1, FunctionState.FAILED, "late") is None
    assert store.get_function("dev", "echo").state is FunctionState.READY
    store.upsert_function("dev", spec("other"), "c" * 64, "fresh", FunctionState.READY)
    store.upsert_function("someone", spec("theirs"), "d" * 64, "fresh", FunctionState.READY)
    assert [f.name for f in store.list_functions("dev")] == ["echo", "other"]
    assert [f.name for f in store.active_functions()] == ["echo", "other", "theirs"]

    store.set_function_state(first.id, 2, FunctionState.DELETED, "deleted")
    with pytest.raises(NotFound):
        store.get_function("dev", "echo")
    assert store.get_function("dev", "echo", include_deleted=True).state is (
        FunctionState.DELETED)
    assert "echo" not in [f.name for f in store.active_functions()]
    with pytest.raises(IllegalTransition):
        store.set_function_state(first.id, 2, FunctionState.READY)
    again = store.upsert_function("dev", spec(), "e" * 64, "fresh", FunctionState.READY)
    assert again.version == 3 and again.state is FunctionState.READY


def test_snapshots_and_the_manifests_nodes_must_keep(store: Store) -> None:
    fn = store.upsert_function("dev", spec(), "a" * 64, "restore", FunctionState.BUILDING)
    snap_id = store.create_snapshot(fn.id, fn.version, "node0")
    assert store.get_snapshot(snap_id).state is SnapshotState.BUILDING
    manifest = b"\x00manifest\xff" * 100
    store.finish_snapshot(snap_id, SnapshotState.READY, manifest=manifest, stored_bytes=1200)
    store.set_function_state(fn.id, fn.version, FunctionState.READY, "", "restore", snap_id)
    snap = store.get_snapshot(snap_id)
    assert (snap.manifest, snap.stored_bytes, snap.node_id) == (manifest, 1200, "node0")
    assert store.live_manifests() == [manifest]
    live = store.live_snapshots()
    assert [(s.function_id, s.function, s.manifest) for s in live] == [
        (fn.id, "dev/echo", manifest)]
    store.finish_snapshot(snap_id, SnapshotState.QUARANTINED, reason="restore failed")
    assert store.live_manifests() == [] and store.live_snapshots() == []
    with pytest.raises(IllegalTransition):
        store.finish_snapshot(snap_id, SnapshotState.READY)
    with pytest.raises(NotFound):
        store.get_snapshot("snap_missing")


def test_nodes_register_and_change_state(store: Store) -> None:
    store.upsert_node("node1", "10.0.0.1:7071", "http://10.0.0.1:7072", '["d0", "d1"]')
    store.upsert_node("node0", "10.0.0.2:7071", "http://10.0.0.2:7072", "[]")
    store.set_node_state("node1", "lost")
    nodes = {n.id: n for n in store.list_nodes()}
    assert list(nodes) == ["node0", "node1"]
    assert nodes["node1"].state == "lost" and nodes["node1"].device_ids == ("d0", "d1")
    # Registering again brings it back, at its new address.
    store.upsert_node("node1", "10.0.0.9:7071", "http://10.0.0.9:7072", '["d0"]')
    node1 = {n.id: n for n in store.list_nodes()}["node1"]
    assert (node1.state, node1.control_address) == ("ready", "10.0.0.9:7071")


def test_instances_live_until_ended_once(store: Store) -> None:
    fn = store.upsert_function("dev", spec(), "a" * 64, "fresh", FunctionState.READY)
    store.add_instance("inst_a", fn.id, fn.version, "node0", "restore")
    store.add_instance("inst_b", fn.id, fn.version, "node1", "fresh")
    live = store.live_instances()
    assert [(i.id, i.node_id, i.start_kind, i.version) for i in live] == [
        ("inst_a", "node0", "restore", 1), ("inst_b", "node1", "fresh", 1)]
    store.end_instance("inst_a", "idle past scaledown_window")
    store.end_instance("inst_a", "a later reason is not recorded")
    ended = store.get_instance("inst_a")
    assert (ended.state, ended.end_reason) == ("gone", "idle past scaledown_window")
    assert [i.id for i in store.live_instances()] == ["inst_b"]
    store.end_instance("inst_missing", "nothing happens")
    with pytest.raises(NotFound):
        store.get_instance("inst_missing")
