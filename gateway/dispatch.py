"""One invocation's way through the gateway: admission (circuit breakers, the
function's queue bound), an instance lease, the request to the node's data plane, and
the outcome (lease kept or released, breakers and metrics told).

The route handlers (invoke.py, openai_api.py) open an Exchange and decide how to
answer the client from it; the Exchange settles the lease exactly once.

The client's own deadline (X-Thaw-Timeout) covers the wait for an instance and the
answer. When it passes the client gets 504 at once, but the work already started is
not abandoned halfway: a lease still being acquired is kept for the next call when it
arrives, and a handler still running keeps its lease until it answers (its slot on the
instance is busy until then; the function's own timeout bounds it). A stream is cut
instead: the generator is closed at its next item.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

import structlog
from tenacity import AsyncRetrying, RetryCallState

from thaw.core.errors import DeadlineExceeded, InstanceFailed, SnapshotError, ThawError
from thaw.core.priority import PRIORITY_DEFAULT
from thaw.gateway import tracing
from thaw.gateway.admission import FunctionQueues
from thaw.gateway.breaker import Breakers, Permit
from thaw.gateway.errors import CircuitOpen, InstanceBusy
from thaw.gateway.leases import LeasePool
from thaw.gateway.metrics import GatewayMetrics
from thaw.gateway.nodeclient import NodeAnswer, NodeClient
from thaw.gateway.request import IDEMPOTENCY_HEADER
from thaw.gateway.timing import server_timing
from thaw.proto import agent_pb2, scheduler_pb2

log = structlog.get_logger()

START_NAMES = {agent_pb2.START_UNSPECIFIED: "warm", agent_pb2.START_RESTORE: "restore",
               agent_pb2.START_FRESH: "fresh"}
# Data-plane answers after which the instance is gone (crashed, hung and killed, out of
# memory and exited): the lease is released as failed so it is never reused.
INSTANCE_LOST_STATUSES = frozenset((502, 504, 507))
# Refusals by the data plane before the handler ran (platform/dataplane.py): the
# instance left (503) or is full (429, a slot the scheduler thought free). Safe to
# retry once on a fresh lease; their bodies are small JSON.
REFUSAL_STATUSES = frozenset((429, 503))
REFUSAL_CODES = frozenset(("instance_unavailable", "instance_busy"))
# Set by the in-instance runtime on an error a handler raised on purpose (HTTPError,
# InvalidInput: snapshotter/runtime/errors.py, which names the same header). Such an
# answer is the function working: never a refusal, never a failure. The runtime refuses
# to mark INSTANCE_LOST_STATUSES, and a marked one is still taken for lost.
TENANT_ERROR_HEADER = "X-Thaw-Error"
TENANT_ERROR_VALUE = "tenant"
# A slot can stay busy on the node a moment after the scheduler freed it (the node
# finishes a call whose client left): retries back off from this, doubling, this often.
BUSY_RETRY_SECONDS = 0.05
REFUSAL_RETRIES = 5
# Answers up to this size with a Content-Length are read whole and sent in one write;
# larger ones are relayed as they arrive.
BUFFER_MAX_BYTES = 1024 * 1024
# The node ends every call within the function's timeout (it kills the handler then);
# past that plus this grace the gateway stops waiting for the node's answer, so a
# node that never ends a response cannot hold a client (or a shutdown) forever.
NODE_GRACE_SECONDS = 5.0


class StreamBroken(InstanceFailed):
    """The node's answer broke off midway (the node or instance went away)."""

    code = "instance_failed"


class NodeUnreachable(InstanceFailed):
    """The node's data plane could not be reached (a node failure, not the function's)."""

    code = "node_unreachable"


class NodeRefused(NodeUnreachable):
    """The node refused the connection: nothing was sent, so any call may go again (an
    agent restarting behind a lease the gateway still held)."""


def _refused(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionRefusedError) or isinstance(
        exc.__cause__, ConnectionRefusedError)


# Errors of placement or of the call that say the function itself is broken (its
# instances crash, hang, or fail to start); they count against its circuit.
FUNCTION_FAILURES = (InstanceFailed, SnapshotError)


@dataclass(frozen=True)
class Call:
    """What the client asked for, once authenticated and read."""

    tenant: str
    name: str
    path: str
    """Sub-path after the function, with its leading slash ("/v1/embeddings"), or ""."""
    body: bytes
    headers: dict[str, str]
    request_id: str
    timeout: float | None = None
    """The client's own deadline (X-Thaw-Timeout), seconds from `received`."""
    received: float = 0.0
    """Loop time the request arrived."""
    arrived: float = 0.0
    """perf_counter the request arrived, for Server-Timing's `admission` (finer than
    `received` where the loop's clock counts whole milliseconds); 0: use `received`."""
    priority: int = PRIORITY_DEFAULT
    """1-100: its place among the function's waiting calls (gateway/priority.py)."""
    key_id: str = ""
    """The API key that called (for metering); "" without one."""

    @property
    def function(self) -> str:
        return f"{self.tenant}/{self.name}"

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.received + self.timeout

    def remaining(self) -> float | None:
        deadline = self.deadline
        return None if deadline is None else deadline - asyncio.get_running_loop().time()

    def deadline_error(self, while_: str) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the request's deadline (X-Thaw-Timeout: {self.timeout:g}s) passed {while_}",
            field="X-Thaw-Timeout")


class Settlement(enum.Enum):
    """How an exchange ended, for the lease and the breakers."""

    ANSWERED = "answered"
    """The node answered in full: the status says whether the instance is fine."""
    ABORTED = "aborted"
    """The client left or its deadline passed midway: no verdict; lease released."""
    BROKEN = "broken"
    """The answer broke off: the instance is suspect; lease released as failed."""


def merged_stages(timings: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """A start's stages with each name once, in first-seen order, repeats added up: a
    cold start waits in the scheduler's queue and then in its node's (the activation
    budget, thaw.platform.activation), and both waits are the one `queue` stage."""
    merged: dict[str, float] = {}
    for stage, seconds in timings:
        merged[stage] = merged.get(stage, 0.0) + seconds
    return list(merged.items())


class Exchange:
    """An upstream answer whose head has arrived; the body is read or streamed."""

    def __init__(self, dispatcher: Dispatcher, call: Call, lease: scheduler_pb2.Lease,
                 upstream: NodeAnswer, start: str,
                 stages: list[tuple[str, float]], function_permit: Permit | None,
                 node_permit: Permit | None, started: float, sent: float) -> None:
        self.dispatcher = dispatcher
        self.call = call
        self.lease = lease
        self.upstream = upstream
        self.start = start
        self.stages = stages
        self.function_permit = function_permit
        self.node_permit = node_permit
        self.started = started
        """perf_counter when the call was admitted (Server-Timing's total)."""
        self.admission = 0.0
        """Seconds from the request's arrival to `started` (set by Dispatcher.open)."""
        self.leasing = started
        """perf_counter when this exchange's lease was asked for (later than `started`
        when earlier exchanges were refused)."""
        self.sent = sent
        """perf_counter when the request went to the node (the "run" stage)."""
        self.opened = time.perf_counter()
        """perf_counter when the answer's head arrived (the run span's end)."""
        self.run_span = ""
        """The id of the span the node's request carried as its parent (tracing)."""
        self.settled = False
        self.give_up_at = node_give_up_at(lease)
        self.bytes_out = 0
        """Answer bytes read from the node so far (metering)."""

    @property
    def status(self) -> int:
        return self.upstream.status

    @property
    def content_type(self) -> str:
        return self.upstream.headers.get("Content-Type", "")

    @property
    def tenant_error(self) -> bool:
        """The handler answered this error itself (TENANT_ERROR_HEADER)."""
        return (self.upstream.status >= 400
                and self.upstream.headers.get(TENANT_ERROR_HEADER) == TENANT_ERROR_VALUE)

    @property
    def buffered(self) -> bool:
        """A complete answer of known, modest size (not a stream)."""
        length = self.upstream.content_length
        return length is not None and length <= BUFFER_MAX_BYTES

    async def read(self) -> bytes:
        """The whole answer; past the client's deadline, 504 now and the lease is
        settled when the handler answers."""
        if self.buffered:  # read with the head (Dispatcher._post): no wait, no I/O
            body = await self.upstream.read()
            self.bytes_out = len(body)
            return body
        remaining = self.call.remaining()
        if remaining is None:
            return await self._read_all()
        task = asyncio.get_running_loop().create_task(self._read_all())
        done, _ = await asyncio.wait({task}, timeout=max(remaining, 0.0))
        if done:
            return task.result()
        self.settled = True
        self.dispatcher.leases.spawn(self._settle_when_read(task))
        raise self.call.deadline_error("while the function ran")

    async def _read_all(self) -> bytes:
        try:
            async with asyncio.timeout_at(self.give_up_at):
                body = await self.upstream.read()
        except TimeoutError:
            raise self._overdue() from None
        except ConnectionError as exc:
            raise StreamBroken(f"the node's answer broke off: {exc}") from exc
        self.bytes_out = len(body)
        return body

    def _overdue(self) -> StreamBroken:
        return StreamBroken(
            f"the node's answer did not end within the function's timeout "
            f"({self.lease.timeout_seconds:g}s) and {NODE_GRACE_SECONDS:g}s more")

    async def _settle_when_read(self, task: asyncio.Task[bytes]) -> None:
        try:
            await task
        except ThawError:
            self._settle_now(Settlement.BROKEN)
        else:
            self._settle_now(Settlement.ANSWERED)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The answer as it arrives. Raises StreamBroken or DeadlineExceeded."""
        client_deadline = self.call.deadline
        deadline = self.give_up_at
        if client_deadline is not None and (deadline is None or client_deadline < deadline):
            deadline = client_deadline
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await self.upstream.readany()
            except TimeoutError:
                if deadline == client_deadline:
                    raise self.call.deadline_error("while the answer streamed") from None
                raise self._overdue() from None
            except ConnectionError as exc:
                raise StreamBroken(f"the node's answer broke off: {exc}") from exc
            if not chunk:
                return
            self.bytes_out += len(chunk)
            yield chunk

    def server_timing(self, upstream_timing: bool = True, total: bool = False) -> str:
        """Every stage of the call, adding up to `total` (gateway/timing.py)."""
        upstream = self.upstream.headers.get("Server-Timing") if upstream_timing else None
        return server_timing(self.stages, upstream, self.admission, self.started,
                             self.leasing, self.sent, self.opened, total)

    def settle(self, how: Settlement) -> None:
        """Settle the lease and tell the breakers; idempotent."""
        if self.settled:
            return
        self.settled = True
        self._settle_now(how)

    def _settle_now(self, how: Settlement) -> None:
        d = self.dispatcher
        function, node = self.call.function, self.lease.node_id
        status = self.upstream.status
        d.node_breakers.record(node, self.node_permit, True)
        if how is Settlement.ANSWERED and status in INSTANCE_LOST_STATUSES:
            how = Settlement.BROKEN
        if how is Settlement.BROKEN:
            self.upstream.close()
            d.function_breakers.record(function, self.function_permit, False)
            d.lost(self.lease, f"instance failed while serving ({status})")
        elif how is Settlement.ABORTED:
            self.upstream.close()
            d.function_breakers.record(function, self.function_permit, None)
            d.leases.release_soon(self.lease)
        else:
            # Back to the pool if the body was read to its end, else closed.
            self.upstream.release()
            d.function_breakers.record(function, self.function_permit, True)
            d.leases.done_with(function, self.lease)
        d.metrics.observe_stage("run", time.perf_counter() - self.sent)
        tracing.settled(self, how.value)
        if d.on_settled is not None:
            d.on_settled(self, how)

    async def __aenter__(self) -> Exchange:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            self.settle(Settlement.ANSWERED)
        elif isinstance(exc, StreamBroken):
            self.settle(Settlement.BROKEN)
        else:
            self.settle(Settlement.ABORTED)


def node_give_up_at(lease: scheduler_pb2.Lease) -> float | None:
    if lease.timeout_seconds <= 0:
        return None
    return asyncio.get_running_loop().time() + lease.timeout_seconds + NODE_GRACE_SECONDS


class Dispatcher:
    def __init__(self, leases: LeasePool, nodes: NodeClient, queues: FunctionQueues,
                 function_breakers: Breakers, node_breakers: Breakers,
                 metrics: GatewayMetrics, acquire_wait: float) -> None:
        self.leases = leases
        self.nodes = nodes
        self.queues = queues
        self.function_breakers = function_breakers
        self.node_breakers = node_breakers
        self.metrics = metrics
        self.acquire_wait = acquire_wait
        self.on_settled: Callable[[Exchange, Settlement], None] | None = None
        """Told of every exchange once it is settled (gateway/usage.py meters them);
        must only take note: it runs on the invocation's path."""

    def lost(self, lease: scheduler_pb2.Lease, reason: str) -> None:
        self.leases.release_soon(lease, failed=True, reason=reason)
        self.leases.forget_instance(lease.instance_id)

    async def open(self, call: Call) -> Exchange:
        """Admit the call, lease an instance and send the request; the answer's head
        has arrived when this returns. Raises ThawError for every refusal."""
        started = time.perf_counter()
        if call.arrived > 0:
            admission = max(started - call.arrived, 0.0)
        else:
            admission = (max(asyncio.get_running_loop().time() - call.received, 0.0)
                         if call.received > 0 else 0.0)
        function_permit = self.function_breakers.allow(call.function)
        try:
            lease, start, stages = await self._lease(call, reuse=True)
            try:
                exchange = await self._send(call, lease, start, stages, function_permit,
                                            started)
            except NodeUnreachable as exc:
                # The node died with the call on it: the handler may or may not have
                # run. Only a call the client marked idempotent is sent again, once,
                # to a fresh instance (the scheduler has written that one off); a
                # connection the node refused carried nothing, so any call may.
                if IDEMPOTENCY_HEADER not in call.headers and not isinstance(exc, NodeRefused):
                    raise
                log.info("node lost mid-call; sending the call again",
                         function=call.function, node=lease.node_id,
                         refused=isinstance(exc, NodeRefused))
                leasing = time.perf_counter()
                lease, start, stages = await self._lease(call, reuse=False)
                exchange = await self._send(call, lease, start, stages, function_permit,
                                            started, leasing)
            if exchange.status in REFUSAL_STATUSES and not exchange.tenant_error:
                exchange = await self._past_refusals(call, exchange, function_permit,
                                                     started)
            exchange.admission = admission
            log.debug("dispatched", function=call.function, node=exchange.lease.node_id,
                      instance=exchange.lease.instance_id, start=exchange.start)
            return exchange
        except BaseException as exc:
            failed = isinstance(exc, FUNCTION_FAILURES) and not isinstance(exc, NodeUnreachable)
            self.function_breakers.record(call.function, function_permit,
                                          False if failed else None)
            raise

    async def _past_refusals(self, call: Call, refused: Exchange,
                             function_permit: Permit | None, started: float) -> Exchange:
        """The first exchange that is not a refusal by the data plane (see
        REFUSAL_STATUSES), each refusal settled and followed by a fresh lease: at once
        for an instance that left, backing off for a busy one. InstanceBusy once
        REFUSAL_RETRIES more exchanges were refused, or the next try would come after
        the client's deadline."""
        first: Exchange | None = refused
        last_code = ""

        async def exchange() -> Exchange:
            nonlocal first
            if first is not None:
                opened, first = first, None
                return opened
            leasing = time.perf_counter()
            lease, start, stages = await self._lease(call, reuse=False)
            return await self._send(call, lease, start, stages, function_permit, started,
                                    leasing)

        async def was_refused(state: RetryCallState) -> bool:
            nonlocal last_code
            if state.outcome is None or state.outcome.failed:
                return False  # an error of placement or of the node: raised as it is
            ex: Exchange = state.outcome.result()
            if ex.status not in REFUSAL_STATUSES or ex.tenant_error:
                return False
            code = await self._refusal_code(ex)
            if code is None:
                return False
            self._settle_refusal(ex, code)
            last_code = code
            return True

        def delay(state: RetryCallState) -> float:
            if last_code != "instance_busy":
                return 0.0
            return BUSY_RETRY_SECONDS * 2.0 ** (state.attempt_number - 1)

        def give_up(state: RetryCallState) -> bool:
            remaining = call.remaining()
            return state.attempt_number > REFUSAL_RETRIES or (
                remaining is not None and remaining <= state.upcoming_sleep)

        def busy(state: RetryCallState) -> Exchange:
            raise InstanceBusy(f"the instances of {call.function} are busy on their "
                               "node; retry shortly", retry_after=1.0)

        retrying = AsyncRetrying(retry=was_refused, wait=delay, stop=give_up,
                                 retry_error_callback=busy)
        opened: Exchange = await retrying(exchange)
        return opened

    async def _lease(self, call: Call, reuse: bool
                     ) -> tuple[scheduler_pb2.Lease, str, list[tuple[str, float]]]:
        if reuse:
            kept = self.leases.take_idle(call.function)
            if kept is not None:
                self.metrics.lease_reuses.inc()
                return kept, "warm", [("queue", 0.0)]
        queued = time.perf_counter()
        with self.queues.waiting(call.function):
            remaining = call.remaining()
            if remaining is not None and remaining <= 0:
                raise call.deadline_error("before an instance was requested")
            wait = self.acquire_wait if remaining is None else min(self.acquire_wait,
                                                                   remaining)
            try:
                lease, handed_off = await self.leases.obtain(
                    call.function, call.tenant, call.name, wait, remaining,
                    call.priority, call.request_id)
            except TimeoutError:
                raise call.deadline_error("while waiting for an instance") from None
        if handed_off:
            self.metrics.lease_reuses.inc()
            return lease, "warm", [("queue", time.perf_counter() - queued)]
        start = START_NAMES.get(lease.start, "warm")
        if start != "warm":
            self.metrics.cold_starts.labels(start).inc()
        stages = merged_stages((t.stage, t.seconds) for t in lease.timings)
        for stage, seconds in stages:
            self.metrics.observe_stage(stage, seconds)
        return lease, start, stages

    async def _send(self, call: Call, lease: scheduler_pb2.Lease, start: str,
                    stages: list[tuple[str, float]], function_permit: Permit | None,
                    started: float, leasing: float | None = None) -> Exchange:
        node = lease.node_id
        try:
            node_permit = self.node_breakers.allow(node)
        except CircuitOpen:
            self.leases.release_soon(lease)
            raise
        sent = time.perf_counter()
        url = f"{lease.data_url}/v1/instances/{lease.instance_id}/invoke{call.path}"
        headers = dict(call.headers)  # as the edge chose them (request.call_headers)
        headers["X-Request-ID"] = call.request_id
        run_span = tracing.hop_headers(headers)
        try:
            remaining = call.remaining()
            if remaining is None:
                upstream = await self._post(url, call.body, headers, lease)
            else:
                sending = asyncio.get_running_loop().create_task(
                    self._post(url, call.body, headers, lease))
                done, _ = await asyncio.wait({sending}, timeout=max(remaining, 0.0))
                if not done:
                    self.node_breakers.record(node, node_permit, None)
                    self.leases.spawn(self._settle_late(call, lease, sending, start, stages,
                                                        started, sent))
                    raise call.deadline_error("while the function ran")
                upstream = sending.result()
        except StreamBroken as exc:
            self.node_breakers.record(node, node_permit, True)
            self.lost(lease, str(exc))
            raise
        except (ConnectionError, OSError, TimeoutError) as exc:
            self.node_breakers.record(node, node_permit, False)
            why = str(exc) or "no answer within the function's timeout"
            self.lost(lease, f"node {node} unreachable: {why}")
            kind = NodeRefused if _refused(exc) else NodeUnreachable
            raise kind(f"the instance's node {node} could not be reached: {why}") from exc
        exchange = Exchange(self, call, lease, upstream, start, stages, function_permit,
                            node_permit, started, sent)
        exchange.run_span = run_span
        exchange.leasing = started if leasing is None else leasing
        return exchange

    async def _post(self, url: str, body: bytes, headers: dict[str, str],
                    lease: scheduler_pb2.Lease) -> NodeAnswer:
        """The node's answer: its head, and its body too when that is small (one
        bounded wait for both, the common case of a warm call)."""
        async with asyncio.timeout_at(node_give_up_at(lease)):
            upstream = await self.nodes.post(url, body, headers)
            length = upstream.content_length
            if length is not None and length <= BUFFER_MAX_BYTES:
                try:
                    await upstream.read()
                except ConnectionError as exc:
                    raise StreamBroken(f"the node's answer broke off: {exc}") from exc
            return upstream

    async def _settle_late(self, call: Call, lease: scheduler_pb2.Lease,
                           sending: asyncio.Task[NodeAnswer], start: str,
                           stages: list[tuple[str, float]], started: float,
                           sent: float) -> None:
        """The client gave up before the head arrived; settle the lease when it does.
        A stream is not read on (nobody listens): closing it stops the generator."""
        try:
            upstream = await sending
        except (ConnectionError, OSError, TimeoutError) as exc:
            self.node_breakers.record(lease.node_id, None, False)
            self.lost(lease, f"node {lease.node_id} unreachable: {exc}")
            return
        exchange = Exchange(self, dataclasses.replace(call, timeout=None), lease, upstream,
                            start, stages, None, None, started, sent)
        if exchange.buffered:
            try:
                await exchange.read()
            except ThawError:
                exchange.settle(Settlement.BROKEN)
                return
            exchange.settle(Settlement.ANSWERED)
        else:
            exchange.settle(Settlement.ABORTED)

    @staticmethod
    async def _refusal_code(exchange: Exchange) -> str | None:
        """The data plane's code when it refused the call before the handler ran;
        None for any other answer (its body is read; read() returns it again)."""
        try:
            code = json.loads(await exchange.upstream.read())["error"]["code"]
        except (ValueError, KeyError, TypeError, ConnectionError):
            return None
        return code if code in REFUSAL_CODES else None

    def _settle_refusal(self, exchange: Exchange, code: str) -> None:
        exchange.settled = True
        exchange.upstream.release()
        self.node_breakers.record(exchange.lease.node_id, exchange.node_permit, True)
        if code == "instance_unavailable":
            self.lost(exchange.lease, "the node says the instance is not serving")
        else:
            self.leases.release_soon(exchange.lease)
        log.info("the node refused the call before it ran; retrying on a fresh lease",
                 function=exchange.call.function, code=code)
