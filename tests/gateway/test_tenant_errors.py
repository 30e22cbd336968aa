"""Errors a handler raised on purpose (marked X-Thaw-Error: tenant by the runtime) are
the function working: the breaker stays closed, a 429/503 of the handler is not taken
for the data plane's refusal, and the live figures and the error-rate alert do not
count them as errors, while their status stays what the caller got."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from thaw.gateway.admission import FunctionQueues
from thaw.gateway.alerts.rules import error_rate
from thaw.gateway.alerts.sources import LiveSources
from thaw.gateway.alerts.view import ClusterView, Rule
from thaw.gateway.breaker import Breakers, BreakerState
from thaw.gateway.dispatch import (
    INSTANCE_LOST_STATUSES,
    TENANT_ERROR_HEADER,
    Call,
    Dispatcher,
    Settlement,
)
from thaw.gateway.errors import CircuitOpen
from thaw.gateway.metrics import GatewayMetrics
from thaw.gateway.stats import FunctionStats
from thaw.proto import scheduler_pb2
from thaw.snapshotter.runtime import errors as runtime_errors

THRESHOLD = 5
TENANT_STATUSES = (400, 404, 409, 422, 429, 500, 503)


class FakeAnswer:
    def __init__(self, status: int, tenant: bool, code: str = "http_error") -> None:
        headers = {"Content-Type": "application/json"}
        if tenant:
            headers[TENANT_ERROR_HEADER] = "tenant"
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        self._body = json.dumps({"error": {"code": code, "message": "no"}}).encode()
        self.content_length = len(self._body)
        self.released = self.closed = False

    async def read(self) -> bytes:
        return self._body

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


class FakeNodes:
    def __init__(self, answers: list[FakeAnswer]) -> None:
        self.answers = answers
        self.sent = 0

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> FakeAnswer:
        self.sent += 1
        return self.answers.pop(0)


class FakeLeases:
    def __init__(self) -> None:
        self.obtained = 0
        self.lost: list[str] = []
        self.released: list[str] = []
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

    def spawn(self, coro: Any) -> None:
        asyncio.get_running_loop().create_task(coro)


def dispatcher(answers: list[FakeAnswer]) -> tuple[Dispatcher, FakeNodes, FakeLeases]:
    nodes, leases = FakeNodes(answers), FakeLeases()
    d = Dispatcher(leases, nodes, FunctionQueues(10, 5),  # type: ignore[arg-type]
                   Breakers("function", THRESHOLD, 60.0), Breakers("node", THRESHOLD, 60.0),
                   GatewayMetrics(), 10.0)
    return d, nodes, leases


def call() -> Call:
    return Call(tenant="t", name="f", path="", body=b"{}", headers={}, request_id="r",
                received=asyncio.get_running_loop().time())


async def answered(d: Dispatcher) -> int:
    ex = await d.open(call())
    await ex.read()
    ex.settle(Settlement.ANSWERED)
    return ex.status


def test_the_header_is_the_one_the_runtime_sets() -> None:
    assert TENANT_ERROR_HEADER == runtime_errors.TENANT_ERROR_HEADER
    # The statuses a handler may not answer are the ones the gateway takes for lost.
    assert runtime_errors.RESERVED_STATUSES == INSTANCE_LOST_STATUSES


async def test_a_hundred_tenant_errors_leave_the_breaker_closed() -> None:
    statuses = [TENANT_STATUSES[i % len(TENANT_STATUSES)] for i in range(100)]
    d, nodes, leases = dispatcher([FakeAnswer(s, tenant=True) for s in statuses])
    seen = [await answered(d) for _ in statuses]
    assert seen == statuses  # each caller got the handler's status
    assert d.function_breakers.get("t/f") is None
    # A handler's 429/503 is its answer, not the data plane's refusal: one lease each,
    # none retried elsewhere, none written off.
    assert nodes.sent == 100 and leases.obtained == 100
    assert len(leases.done) == 100 and leases.lost == [] and leases.released == []


async def test_real_failures_still_trip_the_breaker() -> None:
    d, _, leases = dispatcher([FakeAnswer(502, tenant=False) for _ in range(THRESHOLD)])
    for _ in range(THRESHOLD):
        assert await answered(d) == 502
    breaker = d.function_breakers.get("t/f")
    assert breaker is not None and breaker.state is BreakerState.OPEN
    assert len(leases.lost) == THRESHOLD
    with pytest.raises(CircuitOpen):
        await d.open(call())


async def test_a_marked_lost_status_is_still_a_failure() -> None:
    # The runtime never marks these; a marked one (a handler forging the header) must
    # not keep a lost instance in service.
    d, _, leases = dispatcher([FakeAnswer(504, tenant=True) for _ in range(THRESHOLD)])
    for _ in range(THRESHOLD):
        await answered(d)
    breaker = d.function_breakers.get("t/f")
    assert breaker is not None and breaker.state is BreakerState.OPEN
    assert len(leases.lost) == THRESHOLD


async def test_tenant_errors_between_failures_do_not_reset_or_add_to_them() -> None:
    answers = [FakeAnswer(502, tenant=False), FakeAnswer(500, tenant=True)] * 2
    d, _, _ = dispatcher(answers)
    for _ in answers:
        await answered(d)
    # A tenant's answer is a success for health: it ends the run of failures in a row
    # (and a closed breaker with no failures is dropped).
    assert d.function_breakers.get("t/f") is None


@pytest.mark.parametrize("status", [429, 503])
async def test_the_mark_not_the_body_tells_a_handlers_answer_from_a_refusal(
        status: int) -> None:
    # Whatever its body says, a marked answer came from the handler: it is relayed.
    code = "instance_busy" if status == 429 else "instance_unavailable"
    d, nodes, leases = dispatcher([FakeAnswer(status, tenant=True, code=code)])
    assert await answered(d) == status
    assert nodes.sent == 1 and leases.done == ["l1"]


def test_live_figures_and_the_error_rate_alert_skip_tenant_errors() -> None:
    now = 1000.0
    stats = FunctionStats(clock=lambda: now)
    for i in range(50):
        stats.record("t/tenant", f"a{i}", 500, "warm", "", 1.0, tenant_error=True)
        stats.record("t/tenant", f"b{i}", 422, "warm", "", 1.0, tenant_error=True)
        stats.record("t/broken", f"c{i}", 500, "warm", "", 1.0)
    tenant = stats.function_summary("t/tenant", charts=False)
    broken = stats.function_summary("t/broken", charts=False)
    assert tenant["invocations"] == 100 and tenant["error_rate"] == 0.0
    assert broken["error_rate"] == 1.0
    assert sorted({c.status for c in stats.recent(["t/tenant"], limit=100)}) == [422, 500]

    sources = LiveSources(None, lambda: stats, 60.0)  # type: ignore[arg-type]
    calls = sources.calls(60.0, now)
    assert (calls["t/tenant"].requests, calls["t/tenant"].errors) == (100, 0)
    rule = Rule("error_rate", "critical", 0.05, error_rate, min_requests=10, window=60.0)
    breaches = error_rate(rule, ClusterView(now=now, calls=calls))
    assert [b.subject for b in breaches or []] == ["t/broken"]
