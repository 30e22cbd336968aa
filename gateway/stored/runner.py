"""The worker of stored invocations, one per gateway replica: it claims queued
invocations and runs them through the dispatch path, runs those the function URL
adopted, stores their outcomes, wakes local waiters, and delivers webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from thaw.core.errors import ThawError
from thaw.gateway import tracing
from thaw.gateway.config import GatewaySettings
from thaw.gateway.files import Files
from thaw.gateway.state import Gateway
from thaw.gateway.stored.client import InvocationsClient
from thaw.gateway.stored.outcome import (
    Outcome,
    call_of,
    completion,
    error_outcome,
    keep_files,
    run,
)
from thaw.gateway.stored.result_files import KEEP_SLACK_SECONDS, Links
from thaw.gateway.stored.webhooks import Webhooks
from thaw.proto import invocations_pb2

log = structlog.get_logger()

# Storing a result is tried this often, backing off from this (doubling) between
# tries: the last try comes 15.5 s after the first.
STORE_ATTEMPTS = 6
STORE_BACKOFF_SECONDS = 0.5

# A replica waiting for an invocation another replica runs polls the DB this often
# (doubling up to the max); its own invocations wake their waiters at once.
POLL_SECONDS = 0.1
POLL_MAX_SECONDS = 1.0
# The worker looks for queued work this often when nothing woke it.
CLAIM_POLL_SECONDS = 0.5
# Expired results are swept this often (by every replica; the sweep is idempotent).
SWEEP_SECONDS = 60.0
# Each replica looks this often for webhooks nobody delivers (their replica died, or
# let them go), and delivers at most this many at once.
WEBHOOK_POLL_SECONDS = 1.0
WEBHOOK_CONCURRENCY = 64


class InvocationRunner:
    """One per gateway replica. Runs invocations it claimed (queued ones) or adopted
    (sync calls past the wait limit, first requests with an Idempotency-Key), renews
    their claims while they run, and wakes local waiters when they finish. Delivers
    the webhooks of those it finished, and of others whose replica died."""

    def __init__(self, gw: Gateway, client: InvocationsClient,
                 session: aiohttp.ClientSession,
                 files: Callable[[], Files | None] = lambda: None,
                 links: Callable[[], Links | None] = lambda: None) -> None:
        self.gw = gw
        self.files = files
        """The app's output file store (a getter: it is made after the runner)."""
        self.client = client
        self.session = session
        self.config: GatewaySettings = gw.config
        self.id = f"gw_{uuid.uuid4().hex[:16]}"
        self.webhooks = Webhooks(client, self.id, self.config, session, links=links)
        self.running: dict[str, asyncio.Task[None]] = {}
        self.done_events: dict[str, asyncio.Event] = {}
        self.cut: set[str] = set()
        """Invocations cancelled by a client: their task ends without a result."""
        self.wake = asyncio.Event()
        self.background: set[asyncio.Task[None]] = set()
        self.delivering: dict[str, asyncio.Task[None]] = {}
        """Webhooks this replica holds the claim of, by invocation id."""

    # -- running

    def adopt(self, invocation_id: str, outcome: asyncio.Future[Outcome], tenant: str
              ) -> asyncio.Future[Outcome]:
        """Run to its end a call of `tenant` this replica started, storing its outcome;
        the outcome as stored (its files kept: outcome.keep_files), for a client that
        waits for it."""
        self.done_events.setdefault(invocation_id, asyncio.Event())
        kept = asyncio.ensure_future(self._kept(tenant, outcome))
        self.running[invocation_id] = asyncio.get_running_loop().create_task(
            self._finish(invocation_id, kept))
        return kept

    async def _kept(self, tenant: str, outcome: asyncio.Future[Outcome]) -> Outcome:
        try:
            result = await outcome
        except asyncio.CancelledError:
            outcome.cancel()
            raise
        return await keep_files(self.files(), tenant, result,
                                self.config.result_ttl_seconds + KEEP_SLACK_SECONDS)

    def run_claimed(self, inv: invocations_pb2.Invocation) -> None:
        call = call_of(inv)
        with tracing.stored_run(inv.tenant, inv.function, call.headers):
            self.adopt(inv.id, run(self.gw, call), inv.tenant)

    async def _finish(self, invocation_id: str, outcome: asyncio.Future[Outcome]) -> None:
        try:
            try:
                result = await outcome
            except asyncio.CancelledError:
                outcome.cancel()
                if invocation_id in self.cut:
                    return  # cancelled by the client: the DB says so already
                raise
            except Exception as exc:  # a bug: the invocation still ends, as failed
                log.exception("invocation failed unexpectedly", invocation=invocation_id)
                result = error_outcome(ThawError(f"internal error: {type(exc).__name__}"))
            inv = await self._store(invocation_id, result)
            if inv is not None and inv.webhook_url and inv.webhook_claimed_by == self.id:
                self._deliver(invocation_id, self._fetch_and_deliver(inv.tenant,
                                                                     invocation_id))
        finally:
            self.running.pop(invocation_id, None)
            self.cut.discard(invocation_id)
            event = self.done_events.pop(invocation_id, None)
            if event is not None:
                event.set()
            self.wake.set()

    async def _store(self, invocation_id: str, result: Outcome
                     ) -> invocations_pb2.Invocation | None:
        request = completion(invocation_id, self.id, result, self.config.result_ttl_seconds,
                             webhook_claim_seconds=self.config.invocation_claim_seconds)

        def failed(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            log.warning("storing an invocation's result failed; retrying",
                        invocation=invocation_id,
                        error=exc.message if isinstance(exc, ThawError) else str(exc))

        # The scheduler may be restarting; the result is only in memory here.
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(ThawError),
            stop=stop_after_attempt(STORE_ATTEMPTS),
            wait=wait_exponential(multiplier=STORE_BACKOFF_SECONDS),
            before_sleep=failed, sleep=asyncio.sleep)
        try:
            async for attempt in retrying:
                with attempt:
                    return await self.client.complete(request)
        except RetryError:
            pass
        log.error("an invocation's result could not be stored", invocation=invocation_id)
        return None

    def cancel_local(self, invocation_id: str) -> bool:
        task = self.running.get(invocation_id)
        if task is None:
            return False
        self.cut.add(invocation_id)
        task.cancel()
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # -- waiting

    async def wait_finished(self, tenant: str, invocation_id: str, seconds: float
                            ) -> invocations_pb2.Invocation:
        """The invocation once finished, or as it is when `seconds` have passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        pause = POLL_SECONDS
        while True:
            inv = await self.client.get(tenant, invocation_id)
            remaining = deadline - loop.time()
            if inv.state not in ("queued", "running") or remaining <= 0:
                return inv
            event = self.done_events.get(invocation_id)
            if event is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await event.wait()
                continue
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, POLL_MAX_SECONDS)

    # -- background loops

    async def claim_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLAIM_POLL_SECONDS):
                    await self.wake.wait()
            self.wake.clear()
            free = self.config.async_concurrency - len(self.running)
            if free <= 0:
                continue
            try:
                claimed = await self.client.claim(self.id, free,
                                                  self.config.invocation_claim_seconds)
            except ThawError as exc:
                log.warning("claiming invocations failed", error=exc.message)
                await asyncio.sleep(CLAIM_POLL_SECONDS)
                continue
            for inv in claimed:
                log.info("running invocation", invocation=inv.id,
                         function=f"{inv.tenant}/{inv.function}")
                self.run_claimed(inv)

    async def renew_forever(self) -> None:
        interval = self.config.invocation_claim_seconds / 3
        while True:
            await asyncio.sleep(interval)
            ids, hooks = list(self.running), list(self.delivering)
            if not ids and not hooks:
                continue
            try:
                stop = await self.client.renew(self.id, ids,
                                               self.config.invocation_claim_seconds
                                               ) if ids else []
                lost = await self.client.renew_webhooks(
                    self.id, hooks, self.config.invocation_claim_seconds) if hooks else []
            except ThawError as exc:
                log.warning("renewing invocation claims failed", error=exc.message)
                continue
            for invocation_id in stop:
                # Cancelled through another replica, or claimed elsewhere.
                self.cancel_local(invocation_id)
            for invocation_id in lost:
                # Taken over by another replica (this one was too slow to renew).
                task = self.delivering.get(invocation_id)
                if task is not None:
                    task.cancel()

    async def webhooks_forever(self) -> None:
        """Take over webhooks whose replica died (or let them go) once they are due."""
        while True:
            await asyncio.sleep(WEBHOOK_POLL_SECONDS)
            free = WEBHOOK_CONCURRENCY - len(self.delivering)
            if free <= 0:
                continue
            try:
                claimed = await self.client.claim_webhooks(
                    self.id, free, self.config.invocation_claim_seconds)
            except ThawError as exc:
                log.warning("claiming webhooks failed", error=exc.message)
                continue
            for inv in claimed:
                log.info("delivering a webhook taken over", invocation=inv.id,
                         attempts_made=inv.webhook_attempts)
                self._deliver(inv.id, self.webhooks.deliver(inv))

    async def sweep_forever(self) -> None:
        interval = min(SWEEP_SECONDS, self.config.result_ttl_seconds / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                expired, deleted = await self.client.sweep()
            except ThawError as exc:
                log.warning("sweeping expired invocations failed", error=exc.message)
                continue
            if expired or deleted:
                log.info("invocations swept", expired=expired, deleted=deleted)

    async def close(self) -> None:
        """Stop: unfinished invocations go back to the queue for another replica, and
        undelivered webhooks to whichever replica claims them."""
        unfinished = list(self.running)
        tasks = [*self.running.values(), *self.background]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Deliveries end after their invocations: those just finished may have started
        # one while being cancelled.
        hooks = list(self.delivering)
        deliveries = list(self.delivering.values())
        for task in deliveries:
            task.cancel()
        for task in deliveries:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if unfinished:
            try:
                await self.client.release(self.id, unfinished)
                log.info("invocations handed back to the queue", count=len(unfinished))
            except ThawError as exc:
                log.warning("handing invocations back failed; they are picked up when "
                            "their claims lapse", error=exc.message)
        if hooks:
            try:
                await self.client.release_webhooks(self.id, hooks)
            except ThawError as exc:
                log.warning("handing webhooks back failed; they are picked up when "
                            "their claims lapse", error=exc.message)

    # -- webhooks

    def _deliver(self, invocation_id: str, coro: Any) -> None:
        if invocation_id in self.delivering:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self.delivering[invocation_id] = task

        def done(_task: asyncio.Task[None]) -> None:
            if self.delivering.get(invocation_id) is task:
                del self.delivering[invocation_id]
        task.add_done_callback(done)

    async def _fetch_and_deliver(self, tenant: str, invocation_id: str) -> None:
        try:
            inv = await self.client.get(tenant, invocation_id, with_bodies=True)
        except ThawError as exc:
            # Our claim lapses (nothing renews it once this task ends): another
            # replica, or this one, delivers it then.
            log.warning("reading an invocation for its webhook failed",
                        invocation=invocation_id, error=exc.message)
            return
        await self.webhooks.deliver(inv)


RUNNER_KEY = web.AppKey("invocation_runner", InvocationRunner)
