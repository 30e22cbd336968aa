"""A failed build as the agent answers it: stage, reason and attribute path taken from
whatever the build process reported (it may send any JSON on its status descriptor),
each cut to the reason bound (core/logs.py, docs/limits.md). A refused capture also
carries the handler's input schema, in an otherwise empty manifest: the function runs
with fresh starts and its requests are still checked (docs/function-api.md)."""

from __future__ import annotations

import json

from thaw.core.logs import MAX_REASON_CHARS, bound_reason, cut
from thaw.proto import agent_pb2, manifest_pb2
from thaw.snapshotter.runtime.signature import MAX_SCHEMA_BYTES

# Characters of a stage's name (the runtime's are short words: setup, capture, ...).
MAX_STAGE_CHARS = 64


def event_text(value: object, default: str) -> str:
    """A field of a status event as text: `default` for anything but a non-empty string."""
    return value if isinstance(value, str) and value else default


def schema_text(value: object) -> str:
    """A reported input schema: a JSON object's text within MAX_SCHEMA_BYTES, else ""
    (the build process may send anything; gateways parse what is passed on)."""
    if not isinstance(value, str) or not value or len(value.encode()) > MAX_SCHEMA_BYTES:
        return ""
    try:
        parsed = json.loads(value)
    except ValueError:
        return ""
    return value if isinstance(parsed, dict) else ""


def build_failed(stage: str, reason: object, attribute_path: str = "",
                 input_schema: object = "") -> agent_pb2.BuildSnapshotResponse:
    """The agent's answer to a failed build, every text in it bounded; the schema a
    refused capture read rides in the manifest, the only field set there."""
    schema = schema_text(input_schema)
    return agent_pb2.BuildSnapshotResponse(
        ok=False, stage=cut(stage, MAX_STAGE_CHARS), reason=bound_reason(reason),
        attribute_path=cut(attribute_path, MAX_REASON_CHARS),
        manifest=manifest_pb2.SnapshotManifest(input_schema=schema) if schema else None)
