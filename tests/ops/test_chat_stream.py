"""ops/chat.py's reading of an OpenAI chat stream and its conversation."""

from __future__ import annotations

import json

import pytest

from thaw.core.errors import ThawError
from thaw.ops.chat import Conversation, deltas


def _sse(*payloads: str) -> list[str]:
    lines: list[str] = []
    for payload in payloads:
        lines += [f"data: {payload}", ""]
    return lines


def _chunk(content: str | None) -> str:
    delta = {"content": content} if content is not None else {}
    return json.dumps({"choices": [{"index": 0, "delta": delta}]})


def test_deltas_are_each_chunks_content_until_done() -> None:
    lines = _sse(_chunk(""), _chunk("Hel"), _chunk(None), _chunk("lo"), "[DONE]", _chunk("x"))
    assert list(deltas(iter(lines))) == ["Hel", "lo"]


def test_an_error_midway_raises_its_message() -> None:
    lines = _sse(_chunk("a"), json.dumps({"error": {"message": "instance crashed"}}))
    with pytest.raises(ThawError, match="instance crashed"):
        list(deltas(iter(lines)))


def test_the_conversation_sends_system_then_turns_then_the_new_message() -> None:
    talk = Conversation(system="be brief",
                        turns=[{"role": "user", "content": "a"},
                               {"role": "assistant", "content": "b"}])
    assert [m["role"] for m in talk.messages("c")] == ["system", "user", "assistant", "user"]
    assert Conversation().messages("c") == [{"role": "user", "content": "c"}]
