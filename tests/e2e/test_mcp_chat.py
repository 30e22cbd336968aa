"""MCP and chat end to end against a running platform: the gateway's `/mcp` and
`thaw mcp` (stdio) with the official `mcp` SDK's clients (docs/mcp.md), and
`thaw chat` driven in a pseudo-terminal (docs/chat.md)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import EXAMPLES, FIXTURES, RunningPlatform

# Generous bounds for a slow shared machine: a test fails only if nothing comes.
WAIT_SECONDS = 300


@pytest.fixture(scope="module")
def deployed(platform: RunningPlatform) -> RunningPlatform:
    for folder in (FIXTURES / "typed_rt", EXAMPLES / "echo", FIXTURES / "chat_echo",
                   FIXTURES / "typed_small"):
        resp = platform.deploy(folder)
        assert resp.status_code == 201, resp.text
    return platform


def other_tenant_key(platform: RunningPlatform) -> str:
    made = platform.http.post("/v1/tenants", json={"id": "mcp-other"})
    assert made.status_code in (201, 409), made.text
    key = platform.http.post("/v1/keys", json={"tenant": "mcp-other",
                                               "scopes": ["invoke"], "name": "mcp"})
    assert key.status_code == 201, key.text
    return str(key.json()["key"])


async def _over_http(url: str, key: str, calls: list[tuple[str, dict[str, Any]]]
                     ) -> tuple[list[str], list[Any]]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"},
                              timeout=WAIT_SECONDS)
    async with http, Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
        tools = await client.list_tools()
        results = [await client.call_tool(name, args) for name, args in calls]
    return [tool.name for tool in tools.tools], results


def test_mcp_over_http_lists_and_calls_the_tenants_typed_functions(
        deployed: RunningPlatform) -> None:
    names, results = asyncio.run(_over_http(
        deployed.url, deployed.key,
        [("typed-rt", {"text": "hi", "n": 3}), ("typed-rt", {"text": "hi", "n": 9}),
         ("echo", {"x": 1})]))
    # Typed functions only: echo declares no inputs.
    assert "typed-rt" in names and "echo" not in names, names
    ok, bad_input, untyped = results
    assert not ok.is_error, ok
    assert ok.structured_content["out"] == "hi-hi-hi", ok.structured_content
    assert '"out":' in ok.content[0].text.replace(" ", "")
    # The gateway's 422 check, as a tool error naming the input.
    assert bad_input.is_error and "'n'" in bad_input.content[0].text, bad_input
    assert untyped.is_error and "no tool named 'echo'" in untyped.content[0].text

    # The tool list schema is the function's input schema.
    described = deployed.http.get("/fn/dev/typed-rt/openapi.json").json()
    assert described["paths"]["/fn/dev/typed-rt"]["post"]["requestBody"]


def test_mcp_tool_arguments_are_held_to_the_function_s_body_limit(
        deployed: RunningPlatform) -> None:
    _, (small, large) = asyncio.run(_over_http(
        deployed.url, deployed.key,
        [("typed-small", {"text": "abc"}), ("typed-small", {"text": "x" * 300})]))
    assert not small.is_error and small.structured_content == {"length": 3}, small
    # typed-small's [limits] max_body is 256 bytes: as POST /fn/... would answer 413.
    assert large.is_error and "larger than" in large.content[0].text, large


def test_mcp_is_per_tenant_and_needs_a_key(deployed: RunningPlatform) -> None:
    other = other_tenant_key(deployed)
    names, results = asyncio.run(_over_http(deployed.url, other,
                                            [("typed-rt", {"text": "hi"})]))
    assert names == []
    assert results[0].is_error and "typed-rt" in results[0].content[0].text
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    accept = {"Accept": "application/json, text/event-stream"}
    nokey = httpx.post(f"{deployed.url}/mcp", json=message, headers=accept)
    assert nokey.status_code == 401, nokey.text
    assert nokey.json()["error"]["code"] == "unauthenticated"
    wrong = httpx.post(f"{deployed.url}/mcp", json=message,
                       headers={**accept, "Authorization": "Bearer thaw_nope"})
    assert wrong.status_code == 401, wrong.text


async def _over_stdio(url: str, key: str) -> tuple[list[str], Any]:
    env = {**os.environ, "THAW_URL": url, "THAW_API_KEY": key}
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "thaw.ops.cli", "mcp"], env=env)
    async with Client(params) as client:
        tools = await client.list_tools()
        result = await client.call_tool("typed-rt", {"text": "yo", "sep": " "})
    return [tool.name for tool in tools.tools], result


def test_thaw_mcp_serves_the_same_tools_over_stdio(deployed: RunningPlatform) -> None:
    names, result = asyncio.run(_over_stdio(deployed.url, deployed.key))
    assert "typed-rt" in names and "echo" not in names, names
    assert not result.is_error, result
    assert result.structured_content["out"] == "yo yo"


class Terminal:
    """A command in a pseudo-terminal: what it writes, read as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.fd, child = pty.openpty()
        # Its own session with the terminal as its controlling one: Ctrl-C typed there
        # is a SIGINT to it, as in a real terminal.
        self.proc = subprocess.Popen(args, stdin=child, stdout=child, stderr=child,
                                     env=env, start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(child)
        self.seen = ""

    def expect(self, text: str) -> str:
        """Everything read up to and including `text` (fails if the command ends or
        stays silent for WAIT_SECONDS first)."""
        while text not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], WAIT_SECONDS)
            assert ready, f"nothing more after {self.seen[-500:]!r} (waiting for {text!r})"
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                data = b""
            assert data, f"the command ended before {text!r}: {self.seen[-500:]!r}"
            self.seen += data.decode("utf-8", "replace")
        head, _, tail = self.seen.partition(text)
        self.seen = tail
        return head + text

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode())


@contextmanager
def thaw_chat(p: RunningPlatform, *args: str) -> Iterator[Terminal]:
    """`thaw chat ARGS` against `p` in a terminal; killed if still running after."""
    env = {**os.environ, "THAW_URL": p.url, "THAW_API_KEY": p.key, "TERM": "dumb"}
    term = Terminal([sys.executable, "-m", "thaw.ops.cli", "chat", *args], env)
    try:
        yield term
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait()
        os.close(term.fd)


def test_thaw_chat_streams_keeps_history_and_resets(deployed: RunningPlatform) -> None:
    with thaw_chat(deployed, "chat-echo") as term:
        term.expect("> ")
        term.send("hello there\r")
        # The answer streams in as chunks; the function says what it received.
        first = term.expect("echo: hello there")
        assert "got=1 roles=user " in first, first
        term.expect("> ")
        term.send("second\r")
        second = term.expect("echo: second")
        # The history went with it: user, assistant, user.
        assert "got=3 roles=user,assistant,user " in second, second
        term.expect("> ")
        term.send("/system be brief\r")
        term.expect("(system message set)")
        term.send("/reset\r")
        term.expect("(conversation reset)")
        term.send("third\r")
        third = term.expect("echo: third")
        assert "got=2 roles=system,user system=be brief " in third, third
        term.expect("> ")
        term.send("/exit\r")
        assert term.proc.wait(timeout=WAIT_SECONDS) == 0


def test_thaw_chat_ends_cleanly_on_ctrl_d(deployed: RunningPlatform) -> None:
    with thaw_chat(deployed, "chat-echo") as term:
        term.expect("> ")
        term.send("\x03")  # Ctrl-C at the prompt: the line is dropped, a new prompt
        term.expect("> ")
        term.send("\x04")  # Ctrl-D: the end
        assert term.proc.wait(timeout=WAIT_SECONDS) == 0
        assert "Traceback" not in term.seen


def test_mcp_tool_calls_are_admitted_as_invocations(deployed: RunningPlatform) -> None:
    """Each MCP message is admitted as a call is: the key's budgets hold it (429 naming
    the budget), and a stateless message needs no session."""
    made = deployed.http.post("/v1/keys", json={"scopes": ["invoke"], "name": "mcp-rpd",
                                                "rpd": 2})
    assert made.status_code == 201, made.text
    headers = {"Accept": "application/json, text/event-stream",
               "Authorization": f"Bearer {made.json()['key']}"}
    message = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
               "params": {"name": "typed-rt", "arguments": {"text": "ab"}}}
    for _ in range(2):
        answer = httpx.post(f"{deployed.url}/mcp", json=message, headers=headers,
                            timeout=WAIT_SECONDS)
        assert answer.status_code == 200, answer.text
        result = answer.json()["result"]
        assert result["structuredContent"]["out"] == "ab-ab", result
        assert not result.get("isError"), result
    over = httpx.post(f"{deployed.url}/mcp", json=message, headers=headers,
                      timeout=WAIT_SECONDS)
    assert over.status_code == 429, over.text
    assert over.json()["error"]["field"] == "rpd"
    assert int(over.headers["Retry-After"]) >= 1


def test_mcp_is_served_on_the_function_origin_too(deployed: RunningPlatform) -> None:
    names, results = asyncio.run(_over_http(
        deployed.platform.function_url, deployed.key, [("typed-rt", {"text": "fo"})]))
    assert "typed-rt" in names
    assert results[0].structured_content["out"] == "fo-fo", results[0]


def test_thaw_chat_with_tinylm(deployed: RunningPlatform) -> None:
    """The example model behind the OpenAI routes: an answer streams in and the prompt
    comes back."""
    resp = deployed.deploy(EXAMPLES / "tinylm")
    assert resp.status_code == 201, resp.text
    with thaw_chat(deployed, "tinylm", "--max-tokens", "12", "--temperature", "0") as term:
        term.expect("> ")
        term.send("hello\r")
        echoed = term.expect("hello\r\n")  # the terminal's echo of the line typed
        assert echoed
        answer = term.expect("\r\n> ")
        # Random weights: noise, but as many characters as tokens asked (one a token,
        # an end-of-sequence token may stop it sooner), and no error.
        text = answer.removesuffix("\r\n> ")
        assert "error" not in text and 0 < len(text) <= 12, repr(answer)
        term.send("/exit\r")
        assert term.proc.wait(timeout=WAIT_SECONDS) == 0
