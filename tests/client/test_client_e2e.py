"""thaw.client against a LocalPlatform: deploy a folder, call, stream, submit and wait
for the result, cancel, and the platform's errors raised as typed exceptions; the
AsyncClient the same."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import FIXTURES, RunningPlatform
from thaw.client import (
    AsyncClient,
    Client,
    Conflict,
    InvalidInput,
    NotFound,
    ServerError,
    ThawError,
)


@pytest.fixture()
def client(platform: RunningPlatform) -> Client:
    return Client(platform.url, platform.key, timeout=300)


def test_deploy_call_stream(client: Client) -> None:
    fn = client.deploy(FIXTURES / "echo_rt", force=True)
    assert fn["name"] == "echo-rt" and fn["state"] == "ready", fn
    again = client.deploy(FIXTURES / "echo_rt")
    assert again["unchanged"] and again["version"] == fn["version"]

    echo = client.function("echo-rt")
    assert echo.url == fn["url"] and echo.url.endswith("/fn/dev/echo-rt")
    answer = echo.call(text="hi", n=2)
    assert answer["json"] == {"text": "hi", "n": 2} and answer["method"] == "POST"

    assert client.deploy(FIXTURES / "stream_rt", force=True)["state"] == "ready"
    counter = client.function("stream-rt")
    assert [json.loads(e) for e in counter.stream(n=3)] == [{"i": 0}, {"i": 1}, {"i": 2}]
    got: list[str] = []
    with pytest.raises(ServerError, match="the function failed midway: .*failed at 1"):
        got.extend(counter.stream(n=3, fail_at=1))
    assert [json.loads(e) for e in got] == [{"i": 0}]


def test_submit_result_and_cancel(client: Client) -> None:
    assert client.deploy(FIXTURES / "echo_rt")["state"] == "ready"
    handle = client.function("echo-rt").submit(x=1)
    assert handle.result(timeout=120)["json"] == {"x": 1}
    assert handle.status() == "succeeded"
    assert handle.get()["id"] == handle.id

    assert client.deploy(FIXTURES / "sleep", force=True)["state"] == "ready"
    slow = client.function("sleep").submit(seconds=120)
    assert slow.cancel() == "cancelled"
    with pytest.raises(Conflict) as raised:
        slow.result(timeout=30)
    assert raised.value.status == 409 and raised.value.code == "invocation_cancelled"
    assert slow.status() == "cancelled"


def test_errors_are_typed(client: Client) -> None:
    with pytest.raises(NotFound) as missing:
        client.function("no-such-function").call()
    assert missing.value.status == 404 and "no-such-function" in missing.value.message

    with pytest.raises(InvalidInput) as bad:
        client.request("GET", "/v1/invocations", params={"limit": "many"})
    assert (bad.value.status, bad.value.field) == (400, "limit")

    assert client.deploy(FIXTURES / "tenant_errors_rt")["state"] == "ready"
    with pytest.raises(InvalidInput) as refused:
        client.function("tenant-errors-rt").call(kind="invalid")
    assert (refused.value.status, refused.value.field, refused.value.message) == (
        422, "prompt", "prompt must not be empty")

    with pytest.raises(ThawError) as unauthorized:
        Client(client.url, "not-a-key").function("echo-rt").call()
    assert unauthorized.value.status == 401


def test_async_client(platform: RunningPlatform) -> None:
    async def run() -> None:
        async with AsyncClient(platform.url, platform.key, timeout=300) as client:
            fn = await client.deploy(FIXTURES / "echo_rt")
            assert fn["state"] == "ready"
            echo = client.function("echo-rt")
            assert (await echo.call(a=1))["json"] == {"a": 1}
            handle = await echo.submit(b=2)
            assert (await handle.result(timeout=120))["json"] == {"b": 2}
            assert await handle.status() == "succeeded"
            assert (await client.deploy(FIXTURES / "stream_rt"))["state"] == "ready"
            events = [json.loads(e) async for e in client.function("stream-rt").stream(n=2)]
            assert events == [{"i": 0}, {"i": 1}]
            with pytest.raises(NotFound):
                await client.function("no-such-function").call()

    asyncio.run(run())
