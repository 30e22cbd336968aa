"""A failed build as the agent answers it: stage, reason and attribute path taken from
whatever the build process reported (it may send any JSON on its status descriptor),
each cut to the reason bound (core/logs.py, docs/limits.md)."""

from __future__ import annotations

from thaw.core.logs import MAX_REASON_CHARS, bound_reason, cut
from thaw.proto import agent_pb2

# Characters of a stage's name (the runtime's are short words: setup, capture, ...).
MAX_STAGE_CHARS = 64


def event_text(value: object, default: str) -> str:
    """A field of a status event as text: `default` for anything but a non-empty string."""
    return value if isinstance(value, str) and value else default


def build_failed(stage: str, reason: object, attribute_path: str = ""
                 ) -> agent_pb2.BuildSnapshotResponse:
    """The agent's answer to a failed build, every text in it bounded."""
    return agent_pb2.BuildSnapshotResponse(
        ok=False, stage=cut(stage, MAX_STAGE_CHARS), reason=bound_reason(reason),
        attribute_path=cut(attribute_path, MAX_REASON_CHARS))
