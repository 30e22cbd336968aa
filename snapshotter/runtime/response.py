"""`Response`: what a handler returns to choose its answer's status, headers and
content type (docs/function-api.md, "Full HTTP").

    from thaw.snapshotter.runtime import Response
    return Response(b"...", status=201, headers={"Location": "/fn/t/n/items/7"},
                    content_type="image/png")

The body is bytes, a str (UTF-8), any JSON-able value (encoded as the plain return
value is), an iterator or generator (a stream: bytes and str items go out as they are,
anything else as one JSON line each), or a file (`pathlib.Path` or another
`os.PathLike`: its bytes, with a content type guessed from its name).

Everything is checked here, when the handler builds it, so a bad answer is the
handler's own failure (500, with the traceback in the tenant's log), never a malformed
answer on the wire: the status is 200-599 but the platform's own 502, 504 and 507 (a
1xx is no final answer); header names are HTTP tokens, values carry no line breaks;
at most MAX_HEADERS headers of at most MAX_HEADER_BYTES each. Headers the platform
owns are dropped (RESPONSE_DROPPED_HEADERS, and every X-Thaw-*): hop-by-hop headers
and framing belong to each hop, and `Set-Cookie` is never passed on, since every
tenant's functions share the function origin (a cookie one sets would reach the
others, and the dashboard's host too).
Standard library only: this module is imported inside every instance.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import check_status

MIN_STATUS = 200
MAX_STATUS = 599
# The gateway's head limits (core/http1limits.py): one header line, and how many.
MAX_HEADERS = 64
MAX_HEADER_BYTES = 8190
MAX_HEADERS_TOTAL_BYTES = 64 * 1024
# Headers a handler's answer may not set: each hop's own framing (RFC 9110 §7.6.1),
# what the platform sets itself, and cookies (see the module's docstring).
HOP_BY_HOP_HEADERS = frozenset((
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization"))
RESPONSE_DROPPED_HEADERS = HOP_BY_HOP_HEADERS | frozenset((
    "content-length", "content-type", "date", "server", "server-timing", "set-cookie"))
PLATFORM_HEADER_PREFIX = "x-thaw-"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def dropped_response_header(name: str) -> bool:
    """Whether the platform drops a header of this (any-case) name from a handler's
    answer."""
    lower = name.lower()
    return lower in RESPONSE_DROPPED_HEADERS or lower.startswith(PLATFORM_HEADER_PREFIX)


class Response:
    """An answer of the handler's choosing (see the module's docstring). Raises
    ValueError or TypeError for a status, header or body the platform cannot send."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, body: Any = b"", status: int = 200,
                 headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 content_type: str | None = None) -> None:
        check_status(status, "Response", MIN_STATUS, MAX_STATUS)
        if content_type is not None:
            _check_header("Content-Type", content_type)
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = checked_headers(headers)

    @property
    def file_path(self) -> str | None:
        """The file the body names, or None when the body is not a file."""
        return os.fspath(self.body) if isinstance(self.body, os.PathLike) else None

    def __repr__(self) -> str:
        return f"<Response {self.status} {type(self.body).__name__}>"


def checked_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None
                    ) -> tuple[tuple[str, str], ...]:
    """The headers a handler's answer carries: checked, those the platform owns
    dropped, in their order (a name may repeat)."""
    if headers is None:
        return ()
    pairs = list(headers.items() if isinstance(headers, Mapping) else headers)
    if len(pairs) > MAX_HEADERS:
        raise ValueError(f"a Response may set at most {MAX_HEADERS} headers, "
                         f"got {len(pairs)}")
    kept: list[tuple[str, str]] = []
    total = 0
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"Response headers must be (name, value) pairs, got {pair!r}")
        name, value = pair
        _check_header(name, value)
        total += len(name) + len(value) + 4
        if not dropped_response_header(name):
            kept.append((name, value))
    if total > MAX_HEADERS_TOTAL_BYTES:
        raise ValueError(f"a Response's headers may take at most "
                         f"{MAX_HEADERS_TOTAL_BYTES} bytes, got {total}")
    return tuple(kept)


def _check_header(name: Any, value: Any) -> None:
    if not isinstance(name, str) or not isinstance(value, str):
        raise TypeError(f"Response header names and values must be str, got "
                        f"{type(name).__name__}: {type(value).__name__}")
    if not _TOKEN.match(name):
        raise ValueError(f"Response header name {name[:100]!r} is not an HTTP token")
    if _BAD_VALUE.search(value):
        raise ValueError(f"Response header {name} holds a control character or line "
                         "break")
    try:
        size = len(name) + len(value.encode("latin-1")) + 2
    except UnicodeEncodeError:
        raise ValueError(f"Response header {name} must be Latin-1 text (encode other "
                         "characters, as RFC 8187 says)") from None
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"Response header {name} is {size} bytes, over "
                         f"{MAX_HEADER_BYTES}")
