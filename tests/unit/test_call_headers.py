"""Which request headers a handler sees (gateway/request.py:forwarded_headers) and
which answer headers the gateway passes on (gateway/relay.py, the runtime's
response.py): hop-by-hop headers, credentials and the platform's own never cross."""

from __future__ import annotations

import pytest

from thaw.core.errors import InvalidArgument
from thaw.gateway.request import MAX_FORWARDED_HEADERS, forwarded_headers
from thaw.snapshotter.runtime.response import dropped_response_header


def test_hop_by_hop_credentials_and_platform_headers_are_left_out() -> None:
    sent = [("Content-Type", "application/json"), ("accept", "*/*"),
            ("X-Custom", "a"), ("x-custom", "b"), ("Authorization", "Bearer thaw_k"),
            ("Cookie", "s=1"), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Trailer", "X"),
            ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic x"), ("Proxy-Foo", "y"),
            ("Content-Length", "3"), ("Host", "gw"), ("Expect", "100-continue"),
            ("X-Thaw-Timeout", "5"), ("X-Thaw-Method", "DELETE"),
            ("Idempotency-Key", "k1"), ("User-Agent", "curl/8"),
            ("X-Request-ID", "the gateway sends its own")]
    assert forwarded_headers(sent) == {
        "Content-Type": "application/json", "Accept": "*/*", "x-custom": "a, b",
        "Idempotency-Key": "k1", "user-agent": "curl/8"}


def test_too_many_headers_are_refused_naming_the_field() -> None:
    many = [(f"X-H{i}", "v") for i in range(MAX_FORWARDED_HEADERS + 1)]
    with pytest.raises(InvalidArgument) as caught:
        forwarded_headers(many)
    assert caught.value.field == "headers"
    assert len(forwarded_headers(many[:-1])) == MAX_FORWARDED_HEADERS


@pytest.mark.parametrize("name", ["Set-Cookie", "connection", "Transfer-Encoding",
                                  "Content-Length", "X-Thaw-Error", "x-thaw-start",
                                  "Server", "Date", "Server-Timing", "Upgrade"])
def test_a_handler_cannot_set_the_platforms_headers(name: str) -> None:
    assert dropped_response_header(name)


@pytest.mark.parametrize("name", ["Location", "Cache-Control", "X-Custom", "ETag",
                                  "Content-Disposition", "Access-Control-Allow-Origin"])
def test_a_handler_sets_its_own_headers(name: str) -> None:
    assert not dropped_response_header(name)
