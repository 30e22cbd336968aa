"""The fast lane: plain function calls (`POST /fn/{tenant}/{name}[/{path}]` with an API
key) served by core/http1server.py instead of aiohttp, on the gateway's one port.

Why: aiohttp's server (its request and response objects, router and payload writer)
costs about 0.15 ms a call on a two-core machine, a sixth of the 1 ms the platform may
add to a warm call (`thaw bench overhead`). Everything else, and every function call
that needs more than the plain path (a method other than POST; no key: a public
function; `Prefer`, `Idempotency-Key`, a webhook; a chunked body or one over 1 MiB;
anything with `%` escapes in its path), is handed to aiohttp with its connection, untouched. A
connection stays with aiohttp once handed over: a client that sends API requests and
function calls on one keep-alive connection gets aiohttp's (slower, same) answers to
the calls after its first API request.

The lane runs the same code as aiohttp's route: `errors_middleware` around
`invoke.invoke`, given a LaneRequest that offers the few parts of aiohttp's Request
they read. Streamed answers go out through LaneStreamResponse, which offers the parts
of aiohttp's StreamResponse that `relay.relay` uses. So the answers are the same,
byte for byte in their bodies and in every header but aiohttp's `Server`.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator, MutableMapping
from typing import Any, cast
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from thaw.core.http1server import Claim, Request, ResponseWriter
from thaw.gateway.origins import ON_FUNCTION_ORIGIN_KEY, apply_security_headers
from thaw.gateway.request import IDEMPOTENCY_HEADER, PREFER_HEADER, WEBHOOK_HEADER

FN_PREFIX = "/fn/"
# The lane reads a body whole before the route runs; larger bodies go to aiohttp, whose
# route refuses one past the function's own limit from its Content-Length alone,
# before the body is sent.
LANE_MAX_BODY_BYTES = 1024 * 1024
# Sub-paths of a function URL that aiohttp serves with their own route, not the
# function's (gateway/predictions.py: cog's /fn/{tenant}/{name}/predictions).
OWN_ROUTE_SUB_PATHS = frozenset({"predictions"})
# Request headers that send a call to aiohttp's route (stored invocations).
_HANDED_OFF_HEADERS = (PREFER_HEADER.lower(), IDEMPOTENCY_HEADER.lower(),
                       WEBHOOK_HEADER.lower())


def function_of(path: str) -> tuple[str, str, str] | None:
    """(tenant, name, sub-path) of a function URL's path, as aiohttp's routes
    /fn/{tenant}/{name} and /fn/{tenant}/{name}/{path:.*} match it; None otherwise."""
    if not path.startswith(FN_PREFIX):
        return None
    tenant, _, rest = path[len(FN_PREFIX):].partition("/")
    name, _, sub_path = rest.partition("/")
    if not tenant or not name:
        return None
    return tenant, name, sub_path


def claims(max_body: int = LANE_MAX_BODY_BYTES) -> Claim:
    """The lane's claim (see HTTPServer): which requests it answers."""

    def claim(method: str, path: str, headers: dict[str, str]) -> bool:
        found = function_of(path)
        if method != "POST" or "%" in path or found is None:
            return False
        if found[2] in OWN_ROUTE_SUB_PATHS:
            return False
        length = headers.get("content-length")
        if length is None or not length.isdigit() or int(length) > max_body:
            return False  # chunked, or large: see LANE_MAX_BODY_BYTES
        if "authorization" not in headers or "transfer-encoding" in headers:
            return False
        if "origin" in headers:
            return False  # a browser's call: its CORS headers are aiohttp's (gateway/cors.py)
        return not any(h in headers for h in _HANDED_OFF_HEADERS)

    return claim


class _URL:
    __slots__ = ("raw_query_string",)

    def __init__(self, raw_query_string: str) -> None:
        self.raw_query_string = raw_query_string


class LaneRequest(MutableMapping[Any, Any]):
    """The parts of aiohttp's web.Request that the function-call route reads."""

    def __init__(self, request: Request, app: web.Application, tenant: str, name: str,
                 path: str) -> None:
        """`path`: the sub-path after the function ("" for none; aiohttp's match_info
        has no "path" for /fn/{tenant}/{name} and "" for a trailing slash)."""
        self.raw = request
        self.app = app
        self.method = request.method
        self.path = request.path
        self.match_info = {"tenant": tenant, "name": name}
        if request.path.count("/") > 3:
            self.match_info["path"] = path
        self.rel_url = _URL(request.query_string)
        self.content_length: int | None = len(request.body)
        peer = request.peer
        self.remote = peer[0] if isinstance(peer, tuple) else None
        headers: CIMultiDict[str] = CIMultiDict()
        for key, value in request.headers.items():
            headers[key] = value
        self.headers = CIMultiDictProxy(headers)
        self._state: dict[Any, Any] = {}
        self._query: MultiDictProxy[str] | None = None

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The head's headers as bytes, like aiohttp's (a repeated one joined)."""
        return tuple((k.encode("latin-1"), v.encode("latin-1"))
                     for k, v in self.raw.headers.items())

    @property
    def query(self) -> MultiDictProxy[str]:
        if self._query is None:
            self._query = MultiDictProxy(MultiDict(
                parse_qsl(self.raw.query_string, keep_blank_values=True)))
        return self._query

    async def read(self) -> bytes:
        return self.raw.body

    # The request's own storage (request[KEY]), like aiohttp's.
    def __getitem__(self, key: Any) -> Any:
        return self._state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._state[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._state[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


class LaneStreamResponse:
    """The parts of aiohttp's web.StreamResponse that `relay.relay` uses, writing to
    the lane's connection."""

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers: CIMultiDict[str] = CIMultiDict(headers)
        self.content_length: int | None = None
        self._writer: ResponseWriter | None = None

    @property
    def prepared(self) -> bool:
        return self._writer is not None

    async def prepare(self, request: Any) -> None:
        lane = cast(LaneRequest, request)
        apply_security_headers(self.headers, lane.path,
                               bool(lane.get(ON_FUNCTION_ORIGIN_KEY, False)))
        self._writer = lane.raw.start_response(self.status, head_headers(self.headers),
                                               self.content_length)

    async def write(self, data: bytes) -> None:
        assert self._writer is not None, "prepare() first"
        await self._writer.write(data)

    async def write_eof(self, data: bytes = b"") -> None:
        assert self._writer is not None, "prepare() first"
        if data:
            await self._writer.write(data)
        await self._writer.end()


def stream_response(request: web.Request, status: int, headers: dict[str, str]
                    ) -> web.StreamResponse:
    """A streamed answer for `request`, whichever server it came through."""
    if isinstance(request, LaneRequest):
        return cast(web.StreamResponse, LaneStreamResponse(status, headers))
    return web.StreamResponse(status=status, headers=headers)


_date_cache: tuple[int, str] = (0, "")


def _date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


def head_headers(headers: CIMultiDict[str]) -> dict[str, str]:
    out = {k: v for k, v in headers.items()
           if k.lower() not in ("content-length", "transfer-encoding", "connection")}
    out["Date"] = _date()
    return out
