"""The gateway's audit writer keeps entries, in order, while the scheduler is away."""

from __future__ import annotations

import asyncio

import grpc

from thaw.gateway.audit import AuditWriter
from thaw.proto import tenancy_pb2


class Unreachable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"


class FakeTenancy:
    """AppendAudit that fails while `down`, else stores what it is sent."""

    def __init__(self) -> None:
        self.down = True
        self.stored: list[str] = []
        self.attempts = 0

    def AppendAudit(self, request: tenancy_pb2.AppendAuditRequest,  # noqa: N802 - gRPC name
                    timeout: float) -> asyncio.Future[tenancy_pb2.AppendAuditResponse]:
        self.attempts += 1
        done: asyncio.Future[tenancy_pb2.AppendAuditResponse] = (
            asyncio.get_running_loop().create_future())
        if self.down:
            done.set_exception(Unreachable())
        else:
            self.stored.extend(e.action for e in request.entries)
            done.set_result(tenancy_pb2.AppendAuditResponse(
                ids=list(range(len(request.entries)))))
        return done


async def test_entries_wait_for_the_scheduler_and_keep_their_order() -> None:
    fake = FakeTenancy()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            fake.down = False  # the scheduler is back
        await asyncio.sleep(0)

    writer = AuditWriter(fake, sleep=sleep)  # type: ignore[arg-type]
    stored = [writer.record(tenancy_pb2.AuditEntry(action=f"a{i}", outcome="ok"))
              for i in range(5)]
    task = asyncio.get_running_loop().create_task(writer.run_forever())
    await asyncio.wait_for(asyncio.gather(*stored), 5)
    assert fake.stored == ["a0", "a1", "a2", "a3", "a4"]
    assert slept == [0.2, 0.4, 0.8]  # backing off while it was away
    assert writer.pending == 0 and fake.attempts == 4
    late = writer.record(tenancy_pb2.AuditEntry(action="a5", outcome="ok"))
    await asyncio.wait_for(late, 5)
    assert fake.stored[-1] == "a5"
    task.cancel()
