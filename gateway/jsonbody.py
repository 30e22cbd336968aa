"""JSON bodies, bounded: every route the gateway parses as JSON gets its body read
within max_json_bytes (413 past it) and checked to nest no deeper than max_json_depth
(400 past it) before any handler parses it.

Why: Python's json parser recurses once per level of nesting, so a body of a few
thousand `[` ends in a RecursionError (a 500), and a body of many small containers
costs tens of times its size in memory. The depth is measured by a scan that never
recurses: escapes and strings removed, then the brackets counted.

Which routes: those whose operation in the OpenAPI document (gateway/routes.py
`build_document`) takes only `application/json` bodies. A function URL's body is the
function's (bytes or JSON, bounded by max_body_bytes and its own max_body), never
parsed here. `parse_json` is the one parser for JSON from a client, for code that
reads a body or a message itself.
"""

from __future__ import annotations

import asyncio
import json
import operator
import warnings
from collections.abc import Awaitable, Callable, Mapping
from itertools import accumulate, count
from typing import Any

from aiohttp import web

from thaw.core.errors import InvalidArgument, ThawError
from thaw.gateway.errors import PayloadTooLarge, error_body, error_response
from thaw.gateway.request import PREREAD_BODY_KEY
from thaw.gateway.state import CONFIG_KEY

JSON_MEDIA_TYPE = "application/json"
# Methods whose requests may carry a body a route reads.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Charsets that read JSON's bytes as UTF-8 reads them (RFC 8259 §8.1: JSON is UTF-8).
UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# Nesting counts containers, not their kinds: objects' braces become brackets.
_SQUARE = bytes.maketrans(b"{}", b"[]")
# An opening bracket as 2 and a closing one as 0: the running sum of these, less the
# count of brackets so far, is the depth at each bracket.
_TWICE_OPENS = bytes.maketrans(b"[]", b"\x02\x00")
JSON_ROUTES_KEY = web.AppKey("json_routes", frozenset)
# Where no settings are at hand (`loads`): the max_json_depth setting's default
# (core/config_fields.py GatewayFields), which it must equal.
MAX_JSON_DEPTH = 64


class JSONTooDeep(ValueError):
    """JSON that nests deeper than allowed: a ValueError, as malformed JSON is."""


def _brackets(body: bytes) -> bytes:
    """The brackets and braces of `body` outside its strings, as brackets."""
    if b"\\" in body:
        # Escaped backslashes first, then escaped quotes: as JSON pairs them, from
        # the left of each run of backslashes.
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Escapes gone, a string is what lies between two quotes: every other piece.
    return b"".join(body.split(b'"')[0::2]).translate(_SQUARE, _NOT_BRACKETS)


def _depth(brackets: bytes) -> int:
    return max(map(operator.sub, accumulate(brackets.translate(_TWICE_OPENS)), count(1)),
               default=0)


def nesting_depth(body: bytes) -> int:
    """How deep `body`'s arrays and objects nest (0 for a scalar), found without
    recursion."""
    return _depth(_brackets(body))


def nests_deeper_than(body: bytes, limit: int) -> bool:
    """Whether `body` nests deeper than `limit`: at once when it opens no more
    containers than that, or opens more than that in a row; else by the depth."""
    brackets = _brackets(body)
    if brackets.count(b"[") <= limit:
        return False
    if b"[" * (limit + 1) in brackets:
        return True
    return _depth(brackets) > limit


class BodyTimeout(ThawError):
    """A request body paused longer than body_timeout_seconds (408)."""

    code = "request_timeout"


def _too_large(limit: int, field: str = "body") -> PayloadTooLarge:
    return PayloadTooLarge(f"the JSON body is larger than this gateway's limit of "
                           f"{limit} bytes (max_json_bytes)", field=field)


def check_json(body: bytes, max_bytes: int, max_depth: int, field: str = "body") -> None:
    """Raise PayloadTooLarge (413) or InvalidArgument (400) unless `body` is UTF-8
    JSON text within both bounds (its syntax is the parser's to judge)."""
    if len(body) > max_bytes:
        raise _too_large(max_bytes, field)
    if b"\x00" in body:  # never in JSON text; json.loads would read it as UTF-16
        raise InvalidArgument("the JSON body must be UTF-8 text", field=field)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"the JSON body must be UTF-8 text: {exc}",
                              field=field) from exc
    if nests_deeper_than(body, max_depth):
        raise InvalidArgument(f"the JSON body nests deeper than {max_depth} levels "
                              "(max_json_depth)", field=field)


def parse_json(body: bytes, max_bytes: int, max_depth: int, field: str = "body") -> Any:
    """`body` parsed as JSON within the bounds; InvalidArgument for what is not JSON."""
    check_json(body, max_bytes, max_depth, field)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"the body is not JSON: {exc}", field=field) from exc


def loads(data: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads for JSON from outside the gateway that did not come through a JSON
    route (a WebSocket message, a function's answer): nesting past `max_depth` raises
    JSONTooDeep, a ValueError like any malformed JSON, never a RecursionError."""
    # Scanned as the parser reads it: bytes in UTF-16 or UTF-32 decoded first.
    text = data if isinstance(data, str) else data.decode(json.detect_encoding(data),
                                                          "surrogatepass")
    if nests_deeper_than(text.encode("utf-8", "surrogatepass"), max_depth):
        raise JSONTooDeep(f"JSON nests deeper than {max_depth} levels")
    return json.loads(text)


def error_message(status: int, answer: bytes) -> str:
    """The message of an error answer: {"error": {"message"}} (the gateway's or the
    runtime's), {"error": "..."} (Open Inference's), else its text."""
    try:
        error = loads(answer)["error"]
        message = error["message"] if isinstance(error, dict) else error
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    text = answer[:500].decode("utf-8", "replace").strip()
    return text or f"the function answered {status}"


def json_routes(document: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    """(METHOD, path template) of every operation in an OpenAPI document whose request
    body is JSON only."""
    routes = set()
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            content = (operation.get("requestBody") or {}).get("content", {})
            if content and set(content) == {JSON_MEDIA_TYPE}:
                routes.add((method.upper(), path))
    return frozenset(routes)


@web.middleware
async def json_limits_middleware(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Read and check a JSON route's body before its handler runs."""
    if request.method not in BODY_METHODS or not request.can_read_body:
        return await handler(request)
    resource = request.match_info.route.resource
    routes = request.app.get(JSON_ROUTES_KEY, frozenset())
    if resource is None or (request.method, resource.canonical) not in routes:
        return await handler(request)
    try:
        request = await _read_checked(request)
    except BodyTimeout as exc:
        response = web.json_response(error_body(exc.code, exc.message, exc.field),
                                     status=408)
        response.force_close()  # the rest of the body may still come: not a request
        return response
    except ThawError as exc:
        return error_response(exc)
    return await handler(request)


async def _read_checked(request: web.Request) -> web.Request:
    config = request.app[CONFIG_KEY]
    limit, depth = config.max_json_bytes, config.max_json_depth
    charset = (request.charset or "utf-8").lower()
    if charset not in UTF8_CHARSETS:
        raise InvalidArgument(f"JSON bodies are UTF-8; charset {charset!r} is not read",
                              field="Content-Type")
    length = request.content_length
    if length is not None and length > limit:  # refused before a byte is read
        raise _too_large(limit)
    received = bytearray()
    try:
        async with asyncio.timeout(config.body_timeout_seconds):
            while chunk := await request.content.readany():
                received.extend(chunk)
                if len(received) > limit:  # refused as it arrives
                    raise _too_large(limit)
    except TimeoutError as exc:
        raise BodyTimeout(f"the JSON body did not arrive within "
                          f"{config.body_timeout_seconds:g} s (body_timeout_seconds)",
                          field="body") from exc
    body = bytes(received)
    check_json(body, limit, depth)
    # Back into the request's stream, so that the route reads it as it came, and sees
    # a body to read (request.can_read_body). aiohttp deprecates unread_data for
    # parsers that peek; here the whole body goes back, unchanged.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        request.content.unread_data(body)
    request[PREREAD_BODY_KEY] = body
    return request
