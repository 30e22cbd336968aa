"""`POST /mcp`: the tenant's typed functions as the tools of an MCP server
(Model Context Protocol, streamable HTTP transport; docs/mcp.md).

Every function whose active version has typed inputs (its input schema,
docs/function-api.md) is a tool named after it, its input schema the tool's. A
tenant sees only its own functions: the tenant is the API key's
(`Authorization: Bearer`, as for the rest of the API; no key is 401 before the
protocol is spoken). A tool call goes through the invocation path of a function URL:
admission (the key's scope and rate, once per HTTP request), the function's body
limit, the 422 input check, priority, dispatch with its metering; the answer comes
back as `structuredContent` (the JSON answer; one that is not an object is
`{"result": answer}`) and as text, and every refusal (a bad input, a function that
failed, an unknown tool) is an MCP tool error carrying the message.

Built on the official `mcp` SDK: its low-level `Server` and its
`StreamableHTTPSessionManager` in stateless JSON mode (each POST is one JSON-RPC
exchange, no session held: any gateway replica serves any request, and a session
cannot outlive or cross its key), driven from the aiohttp route through
gateway/mcp_bridge.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import mcp_types as types
from aiohttp import web
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from thaw.core.errors import NotFound, ThawError, Unauthenticated
from thaw.gateway import jsonbody, tracing
from thaw.gateway.admit import admit, new_call
from thaw.gateway.inputs import checked_body, read_schema
from thaw.gateway.mcp_bridge import AIOHTTP_REQUEST, serve
from thaw.gateway.openapi import JSON, _errors
from thaw.gateway.priority import call_priority, check_body_size, function_knobs
from thaw.gateway.request import read_body
from thaw.gateway.state import FUNCTION_KEY, GATEWAY_KEY, PRINCIPAL_KEY, START_KEY
from thaw.snapshotter.runtime.signature import OUTPUT_KEY

MCP_PATH = "/mcp"
PAGE_SIZE = 100
"""Tools per `tools/list` page (the client follows `nextCursor` for the rest)."""
ENVELOPE_BYTES = 64 * 1024
"""Room for the JSON-RPC envelope around a tool call's arguments in a request body;
the arguments themselves are held to the function's own body limit."""

_MANAGER_KEY = web.AppKey("mcp_manager", StreamableHTTPSessionManager)
# The SDK logs each stateless exchange's transport at info ("Terminating session:
# None"): one line per message beside the gateway's own request line. Its warnings
# and errors still show.
_SDK_CHATTY_LOGGERS = ("mcp.server.streamable_http", "mcp.server.streamable_http_manager")


def _request(ctx: ServerRequestContext[Any, Any]) -> web.Request:
    """The aiohttp request a protocol message came in (gateway/mcp_bridge.py)."""
    scope = getattr(ctx.request, "scope", None)
    request = scope.get(AIOHTTP_REQUEST) if isinstance(scope, dict) else None
    if not isinstance(request, web.Request):
        raise RuntimeError("an MCP message outside the gateway's /mcp route")
    return request


def tool_of(name: str, schema: dict[str, Any]) -> types.Tool:
    """The tool of function `name` with input schema `schema`."""
    inputs = {k: v for k, v in schema.items() if k != OUTPUT_KEY}
    inputs.setdefault("type", "object")
    description = schema.get("description")
    if not isinstance(description, str) or not description:
        description = f"Call the thaw function {name}."
    return types.Tool(name=name, description=description, input_schema=inputs)


async def list_tools(ctx: ServerRequestContext[Any, Any],
                     params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    """The tenant's typed functions, by name, a page at a time from `cursor` (the last
    name of the page before)."""
    request = _request(ctx)
    gw = request.app[GATEWAY_KEY]
    tenant = request[PRINCIPAL_KEY].tenant
    after = params.cursor if params is not None and params.cursor else ""
    functions = sorted(await gw.scheduler.list_functions(tenant), key=lambda f: f.name)
    tools: list[types.Tool] = []
    for fn in functions:
        if fn.name <= after:
            continue
        schema = read_schema(fn.input_schema)
        if schema is None:
            continue
        if len(tools) == PAGE_SIZE:
            return types.ListToolsResult(tools=tools, next_cursor=tools[-1].name)
        tools.append(tool_of(fn.name, schema))
    return types.ListToolsResult(tools=tools)


def _tool_error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=message)], is_error=True)


async def call_tool(ctx: ServerRequestContext[Any, Any],
                    params: types.CallToolRequestParams) -> types.CallToolResult:
    """Function `params.name` called with `params.arguments` as its JSON body."""
    request = _request(ctx)
    try:
        status, answer = await _invoke(request, params.name, params.arguments or {})
    except ThawError as exc:
        return _tool_error(exc.message)
    if status >= 400:
        return _tool_error(jsonbody.error_message(status, answer))
    text = answer.decode("utf-8", "replace")
    try:
        result = jsonbody.loads(answer)
    except ValueError:
        return types.CallToolResult(content=[types.TextContent(text=text)],
                                    structured_content={"result": text})
    structured = result if isinstance(result, dict) else {"result": result}
    return types.CallToolResult(content=[types.TextContent(text=text)],
                                structured_content=structured)


async def _invoke(request: web.Request, name: str, arguments: dict[str, Any]
                  ) -> tuple[int, bytes]:
    """The function's status and answer, through the invocation path of its URL."""
    gw = request.app[GATEWAY_KEY]
    p = request[PRINCIPAL_KEY]
    knobs = await function_knobs(request, gw, p.tenant, name)
    if read_schema(knobs.input_schema) is None:
        raise NotFound(f"no tool named {name!r}: the function does not exist or "
                       "declares no typed inputs", field="name")
    body = json.dumps(arguments, separators=(",", ":")).encode()
    await check_body_size(request, gw, p.tenant, name, len(body))
    body = await checked_body(knobs.input_schema, body)
    priority = await call_priority(request, gw, p, p.tenant, name)
    call = new_call(request, p.tenant, name, "", body,
                    {"Content-Type": JSON, "Accept": JSON}, None, priority)
    request[FUNCTION_KEY] = call.function
    # The SDK runs the tool outside the route's task: the call's trace is the request's.
    token = tracing.CURRENT.set(request.get(tracing.TRACE_KEY))
    try:
        tracing.admitted(p.tenant, name)
        async with await gw.dispatcher.open(call) as ex:
            request[START_KEY] = ex.start
            answer = await ex.read()
            return ex.status, answer
    finally:
        tracing.CURRENT.reset(token)


def make_server() -> Server[Any]:
    from importlib import metadata

    return Server("thaw", version=metadata.version("thaw"),
                  instructions="Each tool is a thaw function of your tenant with typed "
                               "inputs; a call runs it and returns its JSON answer.",
                  on_list_tools=list_tools, on_call_tool=call_tool)


@tracing.traced
async def mcp_view(request: web.Request) -> web.StreamResponse:
    """One MCP message (JSON-RPC over HTTP POST) from a key's holder."""
    if not request.headers.get("Authorization"):
        raise Unauthenticated("the MCP server needs an API key "
                              "(Authorization: Bearer <key>)", field="Authorization")
    gw = request.app[GATEWAY_KEY]
    # Who calls, with the invoke scope, within the key's rate: once per message.
    await admit(request, gw)
    body = await read_body(request, gw.config.max_body_bytes + ENVELOPE_BYTES)
    manager = request.app[_MANAGER_KEY]
    return await serve(manager.handle_request, request, body, MCP_PATH)


async def _run_manager(app: web.Application) -> AsyncIterator[None]:
    """The SDK's session manager, run in a task of its own for the app's lifetime (its
    task group must be entered and left by one task)."""
    gw = app[GATEWAY_KEY]
    for name in _SDK_CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    manager = StreamableHTTPSessionManager(
        make_server(), json_response=True, stateless=True,
        max_request_body_size=gw.config.max_body_bytes + ENVELOPE_BYTES)
    app[_MANAGER_KEY] = manager
    started, stop = asyncio.Event(), asyncio.Event()

    async def run() -> None:
        async with manager.run():
            started.set()
            await stop.wait()

    task = asyncio.create_task(run(), name="mcp-session-manager")
    waiting = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiting.cancel()
        task.result()  # its failure, raised at startup
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def add_routes(app: web.Application) -> None:
    app.router.add_post(MCP_PATH, mcp_view)
    app.cleanup_ctx.append(_run_manager)


_RPC_REFUSAL: dict[str, Any] = {
    "description": "Not a message of the protocol (its JSON, its Accept or Content-Type "
                   "headers): a JSON-RPC error.",
    "content": {JSON: {"schema": {"type": "object"}}}}

OPENAPI_PATHS: dict[str, Any] = {
    MCP_PATH: {"post": {
        "summary": "The tenant's typed functions as MCP tools (streamable HTTP)",
        "description": "A JSON-RPC message of the Model Context Protocol "
                       "(initialize, tools/list, tools/call, ...); stateless, answered "
                       "as JSON. Needs an API key with the invoke scope (docs/mcp.md).",
        "requestBody": {"required": True, "content": {JSON: {"schema": {
            "type": "object"}}}},
        "responses": {"200": {"description": "The JSON-RPC answer.",
                              "content": {JSON: {"schema": {"type": "object"}}}},
                      "202": {"description": "A notification, accepted."},
                      **{str(status): _RPC_REFUSAL for status in (400, 406, 415)},
                      **_errors(401, 403, 413, 429, 503)}}},
}
