"""A refused capture's input schema, as the agent passes it on (platform/
build_failures.py) and the version keeps it (scheduler/versions.py)."""

from __future__ import annotations

import json

from thaw.platform.build_failures import build_failed, schema_text
from thaw.snapshotter.runtime.events import Failed, Stage, event_to_line, parse_event
from thaw.snapshotter.runtime.signature import MAX_SCHEMA_BYTES, refused_schema

SCHEMA = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}})


def test_the_schema_rides_in_an_otherwise_empty_manifest() -> None:
    resp = build_failed("capture", "cannot pickle", "self.lock", SCHEMA)
    assert not resp.ok and resp.stage == "capture"
    assert resp.manifest.input_schema == SCHEMA
    assert not resp.manifest.function and not resp.manifest.storages


def test_anything_but_a_bounded_json_object_is_no_schema() -> None:
    too_big = json.dumps({"x": "y" * MAX_SCHEMA_BYTES})
    for value in (None, 7, "", "not json", "[1, 2]", too_big, {"type": "object"}):
        assert schema_text(value) == ""
        assert not build_failed("capture", "r", "", value).HasField("manifest")
    assert schema_text(SCHEMA) == SCHEMA


def test_the_failed_event_carries_the_schema_only_when_there_is_one() -> None:
    line = event_to_line(Failed(Stage.CAPTURE, "r", "self.x", SCHEMA))
    assert parse_event(line) == Failed(Stage.CAPTURE, "r", "self.x", SCHEMA)
    assert b"input_schema" not in event_to_line(Failed(Stage.SETUP, "r"))
    assert Failed(Stage.CAPTURE, "r", None, 5).input_schema == ""  # type: ignore[arg-type]


def test_a_handler_that_raises_reads_as_no_schema() -> None:
    class Hostile:
        def __getattr__(self, name: str) -> object:
            raise RuntimeError("no")

    assert refused_schema(Hostile()) == ""
