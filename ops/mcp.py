"""`thaw mcp`: the gateway's MCP server (`/mcp`, docs/mcp.md) over stdio, for clients
that start their servers as a command (Claude Desktop and the like).

The tools are the gateway's: each `tools/list` and `tools/call` this server receives
is sent on to the gateway's `/mcp` as one JSON-RPC message through thaw.client, with
the CLI's credentials (THAW_URL / THAW_API_KEY, the config file, `thaw up`'s key). So
the tools, their schemas, the invocation path (admission, limits, metering) and the
errors are exactly the HTTP server's; this process only changes the transport.
"""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import click
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.stdio import stdio_server

from thaw.client.aio import AsyncClient
from thaw.core.errors import ThawError

ACCEPT = "application/json, text/event-stream"


class GatewayTools:
    """tools/list and tools/call answered by the gateway's `/mcp`."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._ids = itertools.count(1)

    async def _ask(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The `result` of one JSON-RPC request to the gateway; its `error` raised."""
        message = {"jsonrpc": "2.0", "id": next(self._ids), "method": method,
                   "params": params}
        resp = await self.client.request("POST", "/mcp", json=message,
                                         headers={"Accept": ACCEPT})
        answer = resp.json()
        if not isinstance(answer, dict):
            raise ThawError(f"the gateway's MCP server answered {method} with "
                            f"{type(answer).__name__}, not a JSON-RPC object")
        if "error" in answer:
            error = answer["error"]
            message_text = error.get("message") if isinstance(error, dict) else error
            raise ThawError(f"{method}: {message_text}")
        result = answer.get("result")
        if not isinstance(result, dict):
            raise ThawError(f"the gateway's MCP server answered {method} without a result")
        return result

    async def list_tools(self, ctx: ServerRequestContext[Any, Any],
                         params: types.PaginatedRequestParams | None
                         ) -> types.ListToolsResult:
        cursor = params.cursor if params is not None else None
        result = await self._ask("tools/list", {"cursor": cursor} if cursor else {})
        return types.ListToolsResult.model_validate(result)

    async def call_tool(self, ctx: ServerRequestContext[Any, Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        try:
            result = await self._ask("tools/call", {"name": params.name,
                                                    "arguments": params.arguments or {}})
        except ThawError as exc:
            # The gateway refused the request (the key, its rate): the caller's
            # tool call failed, with the reason.
            return types.CallToolResult(content=[types.TextContent(text=str(exc))],
                                        is_error=True)
        return types.CallToolResult.model_validate(result)


def make_server(client: AsyncClient) -> Server[Any]:
    tools = GatewayTools(client)
    return Server("thaw", instructions="Each tool is a thaw function of your tenant "
                                       "with typed inputs; a call runs it.",
                  on_list_tools=tools.list_tools, on_call_tool=tools.call_tool)


async def serve_stdio(url: str | None = None, key: str | None = None) -> None:
    """Serve the gateway's tools on this process's stdin and stdout until stdin ends."""
    async with AsyncClient(url, key, timeout=600.0) as client:
        server = make_server(client)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())


@click.command("mcp")
@click.option("--url", default=None, help="The gateway (default: as every command).")
def mcp(url: str | None) -> None:
    """Serve your tenant's typed functions as MCP tools over stdio (docs/mcp.md)."""
    anyio.run(serve_stdio, url)
