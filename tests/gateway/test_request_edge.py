"""The invocation path's edge: a function-URL request's headers read once into a frozen
InvokeRequest (gateway/request.py)."""

from __future__ import annotations

import dataclasses

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from thaw.core.errors import InvalidArgument
from thaw.gateway.request import (
    MAX_KEY_CHARS,
    PLAIN,
    InvokeRequest,
    parse_invoke,
    parse_prefer,
)


def request(headers: dict[str, str] | list[tuple[str, str]] | None = None,
            query: str = "") -> InvokeRequest:
    url = "/fn/t/f" + (f"?{query}" if query else "")
    made = make_mocked_request("POST", url, headers=CIMultiDict(headers or {}))
    return parse_invoke(made)


def test_a_plain_call_asks_for_nothing_and_shares_one_object() -> None:
    ask = request({"Content-Type": "application/json"})
    assert ask is PLAIN
    assert not ask.stored and ask.wait_limit(30.0) == 30.0


def test_prefer_respond_async_and_wait() -> None:
    ask = request({"Prefer": "respond-async, wait=5"})
    assert ask.respond_async and ask.wait == 5.0 and ask.stored
    assert ask.wait_limit(30.0) == 5.0 and ask.wait_limit(2.0) == 2.0
    # Several Prefer headers count together; a malformed wait is ignored (RFC 7240).
    ask = request([("Prefer", "wait=abc"), ("Prefer", 'wait="3"')])
    assert not ask.respond_async and ask.wait == 3.0 and not ask.stored
    assert parse_prefer(["wait=-1", "wait=inf", "RESPOND-ASYNC; x=1"]) == (True, None)


def test_idempotency_key_and_webhook_make_a_stored_call_unless_it_streams() -> None:
    ask = request({"Idempotency-Key": "k1"})
    assert ask.idempotency_key == "k1" and ask.stored
    ask = request(query="webhook=https://example.com/hook")
    assert ask.webhook == "https://example.com/hook" and ask.stored
    # A stream is relayed as it is produced: its key only allows a retry.
    ask = request({"Idempotency-Key": "k1", "Accept": "text/event-stream"})
    assert ask.streaming and not ask.stored
    ask = request({"Prefer": "respond-async", "Accept": "text/event-stream"})
    assert ask.stored  # async: the whole output is the result


def test_the_client_timeout_is_read_once() -> None:
    assert request({"X-Thaw-Timeout": "2.5"}).timeout == 2.5
    with pytest.raises(InvalidArgument) as refused:
        request({"X-Thaw-Timeout": "0"})
    assert refused.value.field == "X-Thaw-Timeout"


@pytest.mark.parametrize(("headers", "query", "field"), [
    ({"Idempotency-Key": " "}, "", "Idempotency-Key"),
    ({"Idempotency-Key": "k" * (MAX_KEY_CHARS + 1)}, "", "Idempotency-Key"),
    ({"X-Thaw-Webhook": "ftp://example.com/x"}, "", "X-Thaw-Webhook"),
    ({}, "webhook=http://[", "X-Thaw-Webhook"),
])
def test_malformed_asks_are_refused_with_their_field(headers: dict[str, str], query: str,
                                                     field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        request(headers, query)
    assert refused.value.field == field


def test_the_request_object_is_frozen() -> None:
    ask = request({"Prefer": "respond-async"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ask.respond_async = False  # type: ignore[misc]
