"""A version keeps the input schema its build read (migration 0011), whether the
build captured a snapshot or the version runs with fresh starts."""

from __future__ import annotations

from thaw.core.spec import FunctionSpec
from thaw.scheduler.store import Store
from thaw.scheduler.versions import VersionStore

SCHEMA = '{"type": "object", "properties": {"n": {"type": "integer"}}}'


def test_activate_keeps_the_schema_on_the_version(store: Store) -> None:
    versions = VersionStore(store)
    spec = FunctionSpec(name="schemed", handler="app:H")
    fn, v1 = versions.deploy("dev", spec, "a" * 64, "restore", True)
    assert v1.input_schema == "" and versions.input_schema(fn.id, 1) == ""
    versions.activate(fn.id, 1, start_mode="fresh", reason="refused",
                      input_schema=SCHEMA)
    assert versions.input_schema(fn.id, 1) == SCHEMA
    assert versions.get(fn.id, 1).input_schema == SCHEMA
    # A rollback (no build) leaves what the build read.
    _fn, v2 = versions.deploy("dev", spec, "b" * 64, "restore", True)
    versions.activate(fn.id, 2, start_mode="restore", input_schema="")
    versions.activate(fn.id, 1, start_mode="fresh", after_build=False)
    assert [v.input_schema for v in versions.all(fn.id)] == ["", SCHEMA]
    assert versions.input_schema(fn.id, 99) == ""


def test_a_ready_versions_schema_is_read_once(store: Store) -> None:
    versions = VersionStore(store)
    spec = FunctionSpec(name="cached", handler="app:H")
    fn, _v1 = versions.deploy("dev", spec, "c" * 64, "restore", True)
    # Still building: not kept (its build may yet record one).
    assert versions.input_schema(fn.id, 1) == ""
    versions.activate(fn.id, 1, start_mode="fresh", input_schema=SCHEMA)
    assert versions.input_schema(fn.id, 1) == SCHEMA
    reads: list[object] = []
    real_tx = store._tx

    def counting(tx: object) -> object:
        reads.append(tx)
        return real_tx(tx)  # type: ignore[arg-type]

    store._tx = counting  # type: ignore[method-assign]
    try:
        assert versions.input_schema(fn.id, 1) == SCHEMA
    finally:
        store._tx = real_tx  # type: ignore[method-assign]
    assert reads == []
