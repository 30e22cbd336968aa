"""Dispatcher.open past the data plane's refusals (an instance that left, or one that
is full): each refused exchange is settled and the call goes to a fresh lease, busy
ones after a backoff; too many refusals answer InstanceBusy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from thaw.core.http1 import NodeConnectionError
from thaw.gateway import dispatch
from thaw.gateway.admission import FunctionQueues
from thaw.gateway.breaker import Breakers
from thaw.gateway.dispatch import Call, Dispatcher, NodeUnreachable
from thaw.gateway.errors import InstanceBusy
from thaw.gateway.metrics import GatewayMetrics
from thaw.proto import scheduler_pb2


class FakeAnswer:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
        self.content_length = len(body)
        self._body = body
        self.released = self.closed = False

    async def read(self) -> bytes:
        return self._body

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


def refusal(code: str) -> FakeAnswer:
    status = 429 if code == "instance_busy" else 503
    return FakeAnswer(status, json.dumps({"error": {"code": code}}).encode())


class FakeNodes:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.sent: list[str] = []

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> FakeAnswer:
        self.sent.append(url)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class FakeLeases:
    def __init__(self) -> None:
        self.obtained = 0
        self.released: list[str] = []
        self.lost: list[str] = []
        self.done: list[str] = []

    def take_idle(self, function: str) -> None:
        return None

    async def obtain(self, function: str, tenant: str, name: str, wait: float,
                     remaining: float | None, priority: int, request_id: str
                     ) -> tuple[scheduler_pb2.Lease, bool]:
        self.obtained += 1
        return scheduler_pb2.Lease(
            lease_id=f"l{self.obtained}", node_id="n1", instance_id=f"i{self.obtained}",
            data_url="http://node"), False

    def release_soon(self, lease: scheduler_pb2.Lease, failed: bool = False,
                     reason: str = "") -> None:
        (self.lost if failed else self.released).append(lease.lease_id)

    def forget_instance(self, instance_id: str) -> None:
        pass

    def done_with(self, function: str, lease: scheduler_pb2.Lease) -> None:
        self.done.append(lease.lease_id)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.get_running_loop().create_task(coro)


def dispatcher(answers: list[Any]) -> tuple[Dispatcher, FakeNodes, FakeLeases]:
    nodes, leases = FakeNodes(answers), FakeLeases()
    d = Dispatcher(leases, nodes, FunctionQueues(10, 5),  # type: ignore[arg-type]
                   Breakers("function", 5, 1.0), Breakers("node", 5, 1.0),
                   GatewayMetrics(), 10.0)
    return d, nodes, leases


def call(timeout: float | None = None) -> Call:
    return Call(tenant="t", name="f", path="", body=b"{}", headers={}, request_id="r1",
                timeout=timeout, received=asyncio.get_running_loop().time())


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return pauses


async def test_refusals_go_to_fresh_leases_backing_off_for_busy_ones(
        slept: list[float]) -> None:
    ok = FakeAnswer(200, b'{"ok": true}')
    d, nodes, leases = dispatcher([refusal("instance_busy"), refusal("instance_unavailable"),
                                   refusal("instance_busy"), ok])
    ex = await d.open(call())
    assert ex.status == 200 and ex.upstream is ok and ex.lease.lease_id == "l4"
    assert len(nodes.sent) == 4
    # Busy: backoff doubling from BUSY_RETRY_SECONDS by attempt; unavailable: at once.
    busy = dispatch.BUSY_RETRY_SECONDS
    assert [s for s in slept if s] == [busy, busy * 4]
    assert leases.released == ["l1", "l3"] and leases.lost == ["l2"]
    ex.settle(dispatch.Settlement.ANSWERED)
    assert leases.done == ["l4"]


async def test_too_many_refusals_answer_instance_busy(slept: list[float]) -> None:
    d, nodes, _ = dispatcher([refusal("instance_busy")
                              for _ in range(dispatch.REFUSAL_RETRIES + 1)])
    with pytest.raises(InstanceBusy):
        await d.open(call())
    assert len(nodes.sent) == dispatch.REFUSAL_RETRIES + 1


async def test_no_retry_past_the_clients_deadline(slept: list[float]) -> None:
    # The next try would wait past the deadline: busy at once, one exchange only.
    d, nodes, _ = dispatcher([refusal("instance_busy"), FakeAnswer(200, b"{}")])
    with pytest.raises(InstanceBusy):
        await d.open(call(timeout=dispatch.BUSY_RETRY_SECONDS / 2))
    assert len(nodes.sent) == 1


async def test_an_answer_that_is_no_refusal_is_returned_as_it_is() -> None:
    answer = FakeAnswer(429, b'{"error": {"code": "rate_limited"}}')
    d, nodes, _ = dispatcher([answer])
    ex = await d.open(call())
    assert ex.upstream is answer and len(nodes.sent) == 1


def refused_connection() -> NodeConnectionError:
    error = NodeConnectionError("cannot connect to node: [Errno 111] Connection refused")
    error.__cause__ = ConnectionRefusedError(111, "Connection refused")
    return error


async def test_a_refused_connection_goes_again_to_a_fresh_lease() -> None:
    # Nothing was sent: any call may go again (an agent restarting behind a kept lease).
    ok = FakeAnswer(200, b'{"ok": true}')
    d, nodes, leases = dispatcher([refused_connection(), ok])
    ex = await d.open(call())
    assert ex.status == 200 and ex.lease.lease_id == "l2" and leases.lost == ["l1"]


async def test_a_connection_lost_mid_call_is_not_sent_again_unless_idempotent() -> None:
    d, nodes, _ = dispatcher([ConnectionResetError("reset"), FakeAnswer(200, b"{}")])
    with pytest.raises(NodeUnreachable):
        await d.open(call())
    assert len(nodes.sent) == 1
