"""A version that is never built (`[snapshot] enabled = false`) keeps the input schema
its first fresh start reports; a schema a version has is never replaced; the event
that carries it bounds it (snapshotter/runtime/events.py)."""

from __future__ import annotations

from thaw.core.spec import FunctionSpec
from thaw.platform.build_failures import schema_text
from thaw.scheduler.store import Store
from thaw.scheduler.versions import VersionStore
from thaw.snapshotter.runtime.events import Ready, event_to_line, parse_event

SCHEMA = '{"type": "object", "properties": {"n": {"type": "integer"}}}'
OTHER = '{"type": "object", "properties": {"m": {"type": "string"}}}'


def test_a_never_built_version_learns_its_schema_once(store: Store) -> None:
    versions = VersionStore(store)
    spec = FunctionSpec(name="fresh", handler="app:H", snapshot=False)
    fn, v1 = versions.deploy("dev", spec, "a" * 64, "fresh", False, "no snapshots")
    # Ready, no schema yet: "" is read (and cached) until a start reports one.
    assert versions.input_schema(fn.id, v1.version) == ""
    assert not versions.learn_input_schema(fn.id, v1.version, "")
    assert versions.learn_input_schema(fn.id, v1.version, SCHEMA)
    assert versions.input_schema(fn.id, v1.version) == SCHEMA  # not the cached ""
    assert versions.get(fn.id, v1.version).input_schema == SCHEMA
    # A later start never replaces it.
    assert not versions.learn_input_schema(fn.id, v1.version, OTHER)
    assert versions.get(fn.id, v1.version).input_schema == SCHEMA
    assert not versions.learn_input_schema(fn.id, 99, SCHEMA)


def test_a_built_versions_schema_is_not_replaced(store: Store) -> None:
    versions = VersionStore(store)
    spec = FunctionSpec(name="built", handler="app:H")
    fn, _v1 = versions.deploy("dev", spec, "b" * 64, "restore", True)
    versions.activate(fn.id, 1, start_mode="fresh", reason="refused", input_schema=SCHEMA)
    assert not versions.learn_input_schema(fn.id, 1, OTHER)
    assert versions.input_schema(fn.id, 1) == SCHEMA


def test_ready_carries_the_schema_and_bounds_it() -> None:
    line = event_to_line(Ready(12, {"import": 0.1}, SCHEMA))
    event = parse_event(line)
    assert isinstance(event, Ready) and event.input_schema == SCHEMA
    # Without one the field is left out, and an older runtime's line still parses.
    assert b"input_schema" not in event_to_line(Ready(12, {}))
    bare = parse_event(b'{"event":"ready","pid":3,"timings":{}}')
    assert isinstance(bare, Ready) and bare.input_schema == ""
    odd = parse_event(b'{"event":"ready","pid":3,"timings":{},"input_schema":[1]}')
    assert isinstance(odd, Ready) and odd.input_schema == ""
    # What the agent passes on: a JSON object's text within the bound, else "".
    assert schema_text(SCHEMA) == SCHEMA
    assert schema_text("[1]") == "" and schema_text("{" * 10) == ""
    assert schema_text("{" + '"a":1,' * 20_000 + '"b":2}') == ""
