"""platform/dataplane.py over a real socket, in front of a stand-in instance (a unix
socket server that counts its connections): keep-alive to the instance, slots freed
after whole and streamed answers and when the caller leaves mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from thaw.platform.dataplane import DataPlane
from thaw.platform.instances import Instance, InstanceState

pytestmark = pytest.mark.asyncio


class StandIn:
    """Answers /invoke with an empty body, /invoke/ok with a body, /invoke/stream with
    chunks; /invoke/hold streams one chunk, then waits until the agent hangs up."""

    def __init__(self) -> None:
        self.connections = 0
        self.hold_ended = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ", 2)[1]
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if path == b"/invoke":  # a null function's empty answer
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                elif path == b"/invoke/ok":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                elif path == b"/invoke/stream":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"2\r\na\n\r\n2\r\nb\n\r\n0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"6\r\nfirst\n\r\n")
                    await writer.drain()
                    # Like an instance's generator: it stops once the agent hangs up.
                    if await reader.read(1) == b"":
                        self.hold_ended.set()
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[tuple[str, Instance, StandIn]]:
    stand_in = StandIn()
    socket_path = str(tmp_path / "inst.sock")
    server = await asyncio.start_unix_server(stand_in.serve, socket_path)
    inst = Instance(id="inst_1", function="dev/f", version="1", socket=socket_path,
                    max_concurrency=1, timeout=30.0, state=InstanceState.READY)

    async def follow_nothing() -> None:
        await asyncio.Event().wait()

    async def fail_instance(instance: Instance, reason: str) -> None:
        raise AssertionError(f"no instance should fail here: {reason}")

    agent: Any = SimpleNamespace(
        instances={inst.id: inst}, node_id="node", telemetry=SimpleNamespace(latest=None),
        logs=SimpleNamespace(run=follow_nothing, close=lambda: None),
        fail_instance=fail_instance)
    dataplane = DataPlane(agent, None)
    port = await dataplane.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}/v1/instances/{inst.id}/invoke", inst, stand_in
    finally:
        await dataplane.close()
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


async def until(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_whole_answers_reuse_one_connection_to_the_instance(plane) -> None:  # type: ignore[no-untyped-def]
    url, inst, stand_in = plane
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            empty = await client.post(url, content=b"x")
            assert empty.status_code == 200 and empty.content == b""
            answer = await client.post(f"{url}/ok", content=b"x")
            assert answer.status_code == 200 and answer.content == b"ok"
            assert answer.headers["x-thaw-instance"] == inst.id
    assert stand_in.connections == 1
    assert inst.inflight == 0 and not inst.slots.locked()


async def test_streams_are_relayed_and_free_their_slot(plane) -> None:  # type: ignore[no-untyped-def]
    url, inst, stand_in = plane
    async with httpx.AsyncClient() as client:
        for _ in range(2):
            answer = await client.post(f"{url}/stream")
            assert answer.status_code == 200 and answer.content == b"a\nb\n"
            assert answer.headers["transfer-encoding"] == "chunked"
    assert stand_in.connections == 1
    assert inst.inflight == 0 and not inst.slots.locked()


async def test_a_caller_leaving_mid_stream_frees_the_slot(plane) -> None:  # type: ignore[no-untyped-def]
    url, inst, stand_in = plane
    async with httpx.AsyncClient() as client, client.stream("POST", f"{url}/hold") as answer:
        async for line in answer.aiter_lines():
            assert line == "first"
            break
        assert inst.slots.locked()  # held while the stream runs
    # The caller left: the instance's connection is closed (its generator would stop)
    # and the slot is free for the next call.
    await until(lambda: not inst.slots.locked() and inst.inflight == 0)
    await asyncio.wait_for(stand_in.hold_ended.wait(), 5)


async def test_refusals_before_the_call(plane) -> None:  # type: ignore[no-untyped-def]
    url, inst, _ = plane
    async with httpx.AsyncClient() as client:
        missing = await client.post(url.replace("inst_1", "inst_nope"))
        assert missing.status_code == 503
        assert missing.json()["error"]["code"] == "instance_unavailable"
        await inst.slots.acquire()
        try:
            busy = await client.post(url)
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "instance_busy"
        finally:
            inst.slots.release()
        not_invoke = await client.post(url.replace("/invoke", "/other"))
        assert not_invoke.status_code == 404
