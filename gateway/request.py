"""The edge of the invocation path: a function-URL request's headers read once into a
frozen `InvokeRequest`, and the request's body read within its limit.

Everything after this module takes what it needs from the `InvokeRequest` (or the
dispatch `Call` built from it) and never looks at the raw headers again:
- `Prefer` (RFC 7240): `respond-async` and `wait=N`;
- `Idempotency-Key` (1 to MAX_KEY_CHARS characters);
- a webhook (`X-Thaw-Webhook: <url>` or `?webhook=<url>`);
- `X-Thaw-Timeout: <seconds>`: the client's own deadline;
- `Accept: text/event-stream`: a streamed answer.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from aiohttp import web

from thaw.core.errors import InvalidArgument
from thaw.core.http1limits import BODY_DEADLINE_SECONDS, BODY_TIMEOUT_SECONDS
from thaw.gateway.errors import PayloadTooLarge

IDEMPOTENCY_HEADER = "Idempotency-Key"
WEBHOOK_HEADER = "X-Thaw-Webhook"
INVOCATION_HEADER = "X-Thaw-Invocation"
TIMEOUT_HEADER = "X-Thaw-Timeout"
PREFER_HEADER = "Prefer"
# Keys longer than this are refused (Stripe allows 255 too); the DB column is as wide.
MAX_KEY_CHARS = 255
MAX_WEBHOOK_CHARS = 2048
# Longest deadline a client may ask for: a day; the function's own timeout and the
# wait for placement bound a call well before that.
MAX_CLIENT_TIMEOUT_SECONDS = 86_400.0
# Characters left as they are when a sub-path is encoded again (RFC 3986 pchar and /).
PATH_SAFE = "/:@!$&'()*+,;=-._~"
# Request headers the rest of the gateway reads from a call's headers by these names
# (every other header the handler sees is named in lower case).
CALL_HEADERS = ("Content-Type", "Accept", IDEMPOTENCY_HEADER)
_CANONICAL = {h.lower(): h for h in CALL_HEADERS}
# Request headers a handler never sees: hop-by-hop ones (RFC 9110 §7.6.1, and every
# Proxy-*), each hop's own framing (its length and host are the node's), credentials
# (the caller's API key, cookies of the function origin) and the platform's own.
HOP_BY_HOP_REQUEST_HEADERS = frozenset((
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"))
FRAMING_REQUEST_HEADERS = frozenset(("content-length", "host", "expect"))
# The call's id, which dispatch sends itself (the client's, once checked, or a new one).
REQUEST_ID_HEADER = "x-request-id"
CREDENTIAL_HEADERS = frozenset(("authorization", "cookie"))
_DROPPED = (HOP_BY_HOP_REQUEST_HEADERS | FRAMING_REQUEST_HEADERS | CREDENTIAL_HEADERS
            | {REQUEST_ID_HEADER})
PLATFORM_HEADER_PREFIX = "x-thaw-"
# The method of a call other than POST, which the gateway sends on in this header (its
# hop to the node, and the node's to the instance, are POSTs; the runtime reads it).
METHOD_HEADER = "X-Thaw-Method"
# Headers the gateway sends beside a call's own: its request id, the method.
MAX_FORWARDED_HEADERS = 100
SSE_ACCEPT = "text/event-stream"
# A body read ahead of the route (gateway/jsonbody.py), which read_body hands back.
PREREAD_BODY_KEY = web.RequestKey("preread_body", bytes)
# The app's body_timeout_seconds (set by app.make_app), here where bodies are read.
BODY_TIMEOUT_KEY = web.AppKey("body_timeout", float)
# The app's body_deadline_seconds: the most a whole body may take, however steadily.
BODY_DEADLINE_KEY = web.AppKey("body_deadline", float)


@dataclass(frozen=True, slots=True)
class InvokeRequest:
    """What a function-URL request asks for beyond its body, read once at the edge."""

    respond_async: bool
    """`Prefer: respond-async`: answer 202 with the invocation's id."""
    wait: float | None
    """`Prefer: wait=N` in seconds; None when not asked."""
    idempotency_key: str
    """"" without one."""
    webhook: str
    """The URL the finished invocation is POSTed to; "" without one."""
    timeout: float | None
    """X-Thaw-Timeout in seconds; None without one."""
    streaming: bool
    """The client accepts a stream (SSE)."""

    @property
    def stored(self) -> bool:
        """Whether the call is a stored invocation from the start: async, or with an
        Idempotency-Key or a webhook unless it streams (a stream is relayed as it is
        produced, never stored; its Idempotency-Key only allows a retry). A plain sync
        call becomes one only once it runs past its wait limit."""
        if self.respond_async:
            return True
        return not self.streaming and bool(self.idempotency_key or self.webhook)

    def wait_limit(self, sync_wait_seconds: float) -> float:
        """How long the client waits for the answer before it gets the invocation's
        URL instead: its `wait=N`, capped by the gateway's sync_wait_seconds."""
        return sync_wait_seconds if self.wait is None else min(self.wait,
                                                               sync_wait_seconds)


PLAIN = InvokeRequest(respond_async=False, wait=None, idempotency_key="", webhook="",
                      timeout=None, streaming=False)
"""A request that asks for nothing beyond its body."""


def parse_invoke(request: web.Request) -> InvokeRequest:
    """The request's asks, read from its headers (and `?webhook=`); raises
    InvalidArgument for a malformed one."""
    headers = request.headers
    timeout = client_timeout(headers.get(TIMEOUT_HEADER))
    prefer = headers.getall(PREFER_HEADER, ()) if PREFER_HEADER in headers else ()
    respond_async, wait = parse_prefer(prefer)
    key = idempotency_key_of(headers.get(IDEMPOTENCY_HEADER))
    webhook = webhook_of(headers.get(WEBHOOK_HEADER) or (
        request.query.get("webhook", "") if request.rel_url.raw_query_string else ""))
    streaming = SSE_ACCEPT in headers.get("Accept", "")
    if timeout is None and not prefer and not key and not webhook and not streaming:
        return PLAIN
    return InvokeRequest(respond_async, wait, key, webhook, timeout, streaming)


def parse_prefer(values: tuple[str, ...] | list[str]) -> tuple[bool, float | None]:
    """(respond-async asked, wait=N seconds or None) from Prefer headers (RFC 7240)."""
    respond_async, wait = False, None
    for value in values:
        for pref in value.split(","):
            token, _, arg = pref.split(";")[0].strip().partition("=")
            token = token.strip().lower()
            if token == "respond-async":
                respond_async = True
            elif token == "wait":
                try:
                    seconds = float(arg.strip().strip('"'))
                except ValueError:
                    continue
                if math.isfinite(seconds) and seconds >= 0:
                    wait = seconds
    return respond_async, wait


def prefer_wait(request: web.Request) -> float | None:
    """`Prefer: wait=N` of a request that may only ask to wait (a result URL)."""
    return parse_prefer(request.headers.getall(PREFER_HEADER, []))[1]


def client_timeout(raw: str | None) -> float | None:
    """X-Thaw-Timeout's seconds; None without the header."""
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_CLIENT_TIMEOUT_SECONDS:
        raise InvalidArgument(
            f"{TIMEOUT_HEADER} must be a number of seconds in (0, "
            f"{MAX_CLIENT_TIMEOUT_SECONDS:g}], got {raw!r}", field=TIMEOUT_HEADER)
    return seconds


def webhook_of(url: str) -> str:
    """The webhook URL, checked; "" for none."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # "http://[": not a URL at all
        hostname = None
    if len(url) > MAX_WEBHOOK_CHARS or not hostname or parts.scheme not in (
            "http", "https"):
        raise InvalidArgument(f"the webhook must be an http(s) URL of at most "
                              f"{MAX_WEBHOOK_CHARS} characters, got {url[:100]!r}",
                              field=WEBHOOK_HEADER)
    return url


def idempotency_key_of(key: str | None) -> str:
    """The Idempotency-Key, checked; "" when the header is absent."""
    if key is None:
        return ""
    if len(key) > MAX_KEY_CHARS or not key.strip():
        raise InvalidArgument(f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_KEY_CHARS} "
                              "characters", field=IDEMPOTENCY_HEADER)
    return key


def call_headers(request: web.Request) -> dict[str, str]:
    """The request headers the handler sees, a repeated one joined with ", ", plus
    the method when it is not POST (METHOD_HEADER). Each is within the gateway's head
    limits already (its listeners refused a larger one with 431)."""
    # The head's own bytes, read as Latin-1 by both servers (aiohttp's parsed headers
    # are UTF-8 text, the fast lane's Latin-1): the handler gets the bytes sent.
    headers = forwarded_headers((name.decode("latin-1"), value.decode("latin-1"))
                                for name, value in request.raw_headers)
    if request.method != "POST":
        headers[METHOD_HEADER] = request.method
    return headers


def forwarded_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """`items` less those a handler never sees (see _DROPPED; and any header the
    Connection header names as hop-by-hop)."""
    pairs = list(items)
    listed = {token.strip().lower() for name, value in pairs
              if name.lower() == "connection" for token in value.split(",")}
    out: dict[str, str] = {}
    for name, value in pairs:
        lower = name.lower()
        if (lower in _DROPPED or lower in listed or lower.startswith("proxy-")
                or lower.startswith(PLATFORM_HEADER_PREFIX)):
            continue
        key = _CANONICAL.get(lower, lower)
        previous = out.get(key)
        out[key] = value if previous is None else f"{previous}, {value}"
    if len(out) > MAX_FORWARDED_HEADERS:
        raise InvalidArgument(f"a call may send its function at most "
                              f"{MAX_FORWARDED_HEADERS} headers, got {len(out)}",
                              field="headers")
    return out



def forwarded_path(request: web.Request) -> str:
    """The sub-path and query the handler gets, encoded again for the request line
    (match_info holds it decoded: "a b", not "a%20b")."""
    sub_path = request.match_info.get("path", "")
    path = "/" + quote(sub_path, safe=PATH_SAFE) if sub_path else ""
    query = request.rel_url.raw_query_string
    return f"{path}?{query}" if query else path


async def read_body(request: web.Request, limit: int, described: str = "") -> bytes:
    """The whole body, refusing it (413) as soon as it is known to pass `limit`
    (from Content-Length before reading, else as it arrives), and closing the
    connection (408) when it pauses longer than body_timeout_seconds or has not all
    come within body_deadline_seconds (see `BodyClock`)."""
    described = described or f"this gateway's limit of {limit} bytes (max_body_bytes)"
    too_large = PayloadTooLarge(f"the request body is larger than {described}",
                                field="body")
    length = request.content_length
    if length is not None and length > limit:
        raise too_large
    body: bytes | None = request.get(PREREAD_BODY_KEY)
    if body is None and getattr(request, "content", None) is None:
        body = await request.read()  # the fast lane's: read whole before the route
    if body is not None:
        if len(body) > limit:
            raise too_large
        return body
    clock = BodyClock(request.app)
    received = bytearray()
    while True:
        chunk = await clock.next(request.content.readany, "the request body")
        if not chunk:
            return bytes(received)
        received.extend(chunk)
        if len(received) > limit:
            raise too_large


class BodyClock:
    """The time a body being read has left: body_timeout_seconds from its last chunk,
    and body_deadline_seconds in all from when its reading began (a body trickled a
    byte at a time never pauses long). One timer per read, as without the deadline."""

    __slots__ = ("_end", "_loop", "deadline", "pause")

    def __init__(self, app: web.Application) -> None:
        self.pause = app.get(BODY_TIMEOUT_KEY, BODY_TIMEOUT_SECONDS)
        self.deadline = app.get(BODY_DEADLINE_KEY, BODY_DEADLINE_SECONDS)
        self._loop = asyncio.get_running_loop()
        self._end = self._loop.time() + self.deadline

    async def next(self, read: Callable[[], Awaitable[bytes]], what: str) -> bytes:
        """The next chunk `read` gives (b"" at the end); 408 (web.HTTPRequestTimeout,
        aiohttp then closes the connection) once either bound is past."""
        now = self._loop.time()
        try:
            async with asyncio.timeout_at(min(now + self.pause, self._end)):
                return await read()
        except TimeoutError:
            if self._loop.time() >= self._end:
                text = (f"{what} did not arrive whole within {self.deadline:g} s "
                        "(body_deadline_seconds)")
            else:
                text = f"{what} paused longer than {self.pause:g} s (body_timeout_seconds)"
            raise web.HTTPRequestTimeout(text=text) from None
