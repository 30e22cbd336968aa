"""gateway/mcp.py's tool list: typed functions only, their schemas, a page at a time."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import mcp_types as types
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from thaw.gateway.mcp import PAGE_SIZE, list_tools, tool_of
from thaw.gateway.mcp_bridge import AIOHTTP_REQUEST
from thaw.gateway.state import GATEWAY_KEY, PRINCIPAL_KEY
from thaw.proto import scheduler_pb2
from thaw.snapshotter.runtime.signature import OUTPUT_KEY

SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
          OUTPUT_KEY: {"type": "string"}}


class Scheduler:
    def __init__(self, functions: list[scheduler_pb2.FunctionInfo]) -> None:
        self.functions = functions
        self.asked: list[str] = []

    async def list_functions(self, tenant: str) -> list[scheduler_pb2.FunctionInfo]:
        self.asked.append(tenant)
        return list(self.functions)


def _ctx(scheduler: Scheduler) -> Any:
    app = web.Application()
    app[GATEWAY_KEY] = SimpleNamespace(scheduler=scheduler)  # type: ignore[assignment]
    request = make_mocked_request("POST", "/mcp", app=app)
    request[PRINCIPAL_KEY] = scheduler_pb2.Principal(tenant="acme")
    return SimpleNamespace(request=SimpleNamespace(scope={AIOHTTP_REQUEST: request}))


def test_tools_are_the_typed_functions_a_page_at_a_time() -> None:
    typed = [scheduler_pb2.FunctionInfo(name=f"fn-{i:03d}", input_schema=json.dumps(SCHEMA))
             for i in range(PAGE_SIZE * 2 + 5)]
    untyped = [scheduler_pb2.FunctionInfo(name=f"fn-{i:03d}-plain") for i in range(7)]
    scheduler = Scheduler(untyped + typed[::-1])
    ctx = _ctx(scheduler)

    async def every_page() -> list[list[str]]:
        pages, cursor = [], None
        while True:
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            result = await list_tools(ctx, params)
            pages.append([tool.name for tool in result.tools])
            cursor = result.next_cursor
            if cursor is None:
                return pages

    pages = asyncio.run(every_page())
    assert [len(page) for page in pages] == [PAGE_SIZE, PAGE_SIZE, 5]
    assert sum(pages, []) == [fn.name for fn in typed]  # in name order, once each
    assert set(scheduler.asked) == {"acme"}  # the key's tenant, nothing else


def test_a_tool_is_the_function_s_input_schema() -> None:
    tool = tool_of("fn", SCHEMA)
    # The answer's schema is not an input.
    assert tool.input_schema == {k: v for k, v in SCHEMA.items() if k != OUTPUT_KEY}
    assert tool.input_schema["required"] == ["x"]
    assert tool.description == "Call the thaw function fn."
    described = tool_of("fn", {**SCHEMA, "description": "Adds one."})
    assert described.description == "Adds one."
