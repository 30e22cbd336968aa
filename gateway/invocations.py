"""Invocations whose answer outlives the request (DESIGN.md §9).

- `Prefer: respond-async` on a function URL: 202 + id at once; the call is queued in
  the scheduler's DB and run by the worker of whichever gateway replica claims it.
  With `Prefer: respond-async, wait=N` the call runs here for up to N seconds first
  (RFC 7240), then 202.
- A sync (non-streaming) call still running after `sync_wait_seconds` (or the client's
  `Prefer: wait=N`, if shorter) becomes a stored invocation: the client gets 303 to
  its result URL, which waits the same way and answers with the function's answer.
- `Idempotency-Key`: the first request with a key (per tenant, decided by a unique
  constraint in the DB, so across replicas too) runs the function; every other one
  with the key gets the same answer (status and body) until the result expires; the
  same key with a different request is refused with 422.
- `GET /v1/invocations[/{id}[/result]]`, `POST /v1/invocations/{id}/cancel`.
- Webhook (`X-Thaw-Webhook: <url>` or `?webhook=<url>` at submission): the finished
  invocation is POSTed there as JSON, retried with exponential backoff. The delivery
  is claimed like the invocation (the replica that finished it holds a claim it
  renews); if that replica dies, another one takes the delivery over once the claim
  lapsed and the next attempt is due, counting the attempts already made.

A streaming call (`Accept: text/event-stream`) is relayed as it is produced and is
never stored, unless it is submitted async (then its whole output is the result).
A claimed invocation runs at least once: if its replica dies mid-call, another one
runs it again once the claim lapses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from thaw.core.errors import InvalidArgument, NotFound, ThawError
from thaw.core.grpcutil import call as grpc_call
from thaw.core.priority import PRIORITY_DEFAULT
from thaw.gateway.auth import require
from thaw.gateway.config import GatewaySettings
from thaw.gateway.dispatch import Call, Exchange
from thaw.gateway.errors import (
    IdempotencyKeyReused,
    InvocationCancelled,
    InvocationExpired,
    InvocationFinished,
    PayloadTooLarge,
    error_body,
    status_of,
)
from thaw.gateway.state import GATEWAY_KEY, START_KEY, Gateway
from thaw.proto import invocations_pb2, invocations_pb2_grpc, scheduler_pb2

log = structlog.get_logger()

IDEMPOTENCY_HEADER = "Idempotency-Key"
WEBHOOK_HEADER = "X-Thaw-Webhook"
INVOCATION_HEADER = "X-Thaw-Invocation"
# Keys longer than this are refused (Stripe allows 255 too); the DB column is as wide.
MAX_KEY_CHARS = 255
MAX_WEBHOOK_CHARS = 2048
# Results up to this size are inlined in GET /v1/invocations/{id}; larger ones only
# through the result URL.
INLINE_RESULT_BYTES = 1024 * 1024
# A replica waiting for an invocation another replica runs polls the DB this often
# (doubling up to the max); its own invocations wake their waiters at once.
POLL_SECONDS = 0.1
POLL_MAX_SECONDS = 1.0
# The worker looks for queued work this often when nothing woke it.
CLAIM_POLL_SECONDS = 0.5
# Expired results are swept this often (by every replica; the sweep is idempotent).
SWEEP_SECONDS = 60.0
# Each webhook delivery attempt waits this long for the receiver's answer.
WEBHOOK_TIMEOUT_SECONDS = 10.0
WEBHOOK_MAX_BACKOFF_SECONDS = 300.0
# Each replica looks this often for webhooks nobody delivers (their replica died, or
# let them go), and delivers at most this many at once.
WEBHOOK_POLL_SECONDS = 1.0
WEBHOOK_CONCURRENCY = 64
# What a failed attempt records of its error.
WEBHOOK_ERROR_CHARS = 500
# Metadata calls to the scheduler are quick.
RPC_TIMEOUT = 30.0
JSON_TYPES = ("application/json", "application/problem+json")


# ---- the scheduler's Invocations service ------------------------------------------------

class InvocationsClient:
    def __init__(self, channel: Any) -> None:
        self._stub = invocations_pb2_grpc.InvocationsStub(channel)

    async def create(self, inv: invocations_pb2.Invocation, claimed_by: str = "",
                     claim_seconds: float = 0.0
                     ) -> tuple[invocations_pb2.Invocation, bool]:
        resp = await grpc_call(self._stub.Create(invocations_pb2.CreateInvocationRequest(
            invocation=inv, claimed_by=claimed_by, claim_seconds=claim_seconds),
            timeout=RPC_TIMEOUT))
        return resp.invocation, resp.created

    async def get(self, tenant: str, invocation_id: str, with_bodies: bool = False
                  ) -> invocations_pb2.Invocation:
        return await grpc_call(self._stub.Get(invocations_pb2.GetInvocationRequest(
            tenant=tenant, id=invocation_id, with_bodies=with_bodies), timeout=RPC_TIMEOUT))

    async def list_recent(self, tenant: str, limit: int, state: str, function: str
                   ) -> list[invocations_pb2.Invocation]:
        resp = await grpc_call(self._stub.List(invocations_pb2.ListInvocationsRequest(
            tenant=tenant, limit=limit, state=state, function=function),
            timeout=RPC_TIMEOUT))
        return list(resp.invocations)

    async def claim(self, gateway_id: str, limit: int, claim_seconds: float
                    ) -> list[invocations_pb2.Invocation]:
        resp = await grpc_call(self._stub.Claim(invocations_pb2.ClaimInvocationsRequest(
            gateway_id=gateway_id, limit=limit, claim_seconds=claim_seconds),
            timeout=RPC_TIMEOUT))
        return list(resp.invocations)

    async def renew(self, gateway_id: str, ids: list[str], claim_seconds: float
                    ) -> list[str]:
        resp = await grpc_call(self._stub.Renew(invocations_pb2.RenewClaimsRequest(
            gateway_id=gateway_id, ids=ids, claim_seconds=claim_seconds),
            timeout=RPC_TIMEOUT))
        return list(resp.stop_ids)

    async def complete(self, request: invocations_pb2.CompleteInvocationRequest
                       ) -> invocations_pb2.Invocation:
        return await grpc_call(self._stub.Complete(request, timeout=RPC_TIMEOUT))

    async def release(self, gateway_id: str, ids: list[str]) -> None:
        await grpc_call(self._stub.Release(invocations_pb2.ReleaseInvocationsRequest(
            gateway_id=gateway_id, ids=ids), timeout=RPC_TIMEOUT))

    async def cancel(self, tenant: str, invocation_id: str, ttl_seconds: float
                     ) -> invocations_pb2.Invocation:
        return await grpc_call(self._stub.Cancel(invocations_pb2.CancelInvocationRequest(
            tenant=tenant, id=invocation_id, ttl_seconds=ttl_seconds), timeout=RPC_TIMEOUT))

    async def record_webhook(self, invocation_id: str, state: str, attempts: int,
                             error: str, gateway_id: str = "", retry_in: float = 0.0,
                             claim_seconds: float = 0.0) -> invocations_pb2.Invocation:
        return await grpc_call(self._stub.RecordWebhook(
            invocations_pb2.WebhookDeliveryRequest(
                id=invocation_id, state=state, attempts=attempts, error=error,
                gateway_id=gateway_id, retry_in_seconds=retry_in,
                claim_seconds=claim_seconds), timeout=RPC_TIMEOUT))

    async def claim_webhooks(self, gateway_id: str, limit: int, claim_seconds: float
                             ) -> list[invocations_pb2.Invocation]:
        resp = await grpc_call(self._stub.ClaimWebhooks(invocations_pb2.ClaimWebhooksRequest(
            gateway_id=gateway_id, limit=limit, claim_seconds=claim_seconds),
            timeout=RPC_TIMEOUT))
        return list(resp.invocations)

    async def renew_webhooks(self, gateway_id: str, ids: list[str], claim_seconds: float
                             ) -> list[str]:
        resp = await grpc_call(self._stub.Renew(invocations_pb2.RenewClaimsRequest(
            gateway_id=gateway_id, webhook_ids=ids, claim_seconds=claim_seconds),
            timeout=RPC_TIMEOUT))
        return list(resp.stop_webhook_ids)

    async def release_webhooks(self, gateway_id: str, ids: list[str]) -> None:
        await grpc_call(self._stub.Release(invocations_pb2.ReleaseInvocationsRequest(
            gateway_id=gateway_id, webhook_ids=ids), timeout=RPC_TIMEOUT))

    async def sweep(self) -> tuple[int, int]:
        resp = await grpc_call(self._stub.Sweep(invocations_pb2.SweepInvocationsRequest(),
                                                timeout=RPC_TIMEOUT))
        return resp.expired, resp.deleted


# ---- running a call to a stored result ------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """A finished call, as stored: the function's answer or the platform's error."""

    succeeded: bool
    status: int
    content_type: str
    body: bytes
    error_code: str = ""
    error_message: str = ""
    start: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    """The answer's platform headers (X-Thaw-Node, Server-Timing...) for the client
    that waited for it; not stored."""


def error_outcome(exc: ThawError, start: str = "") -> Outcome:
    return Outcome(False, status_of(exc), "application/json",
                   json.dumps(error_body(exc.code, exc.message, exc.field)).encode(),
                   exc.code, exc.message, start)


def answer_outcome(status: int, content_type: str, body: bytes, start: str) -> Outcome:
    if status < 400:
        return Outcome(True, status, content_type, body, start=start)
    code, message = "function_error", f"the function answered {status}"
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        err = json.loads(body)["error"]
        code, message = str(err["code"]), str(err.get("message", message))
    return Outcome(False, status, content_type, body, code, message, start)


async def read_capped(ex: Exchange, limit: int) -> bytes:
    if ex.buffered:
        return await ex.read()
    body = bytearray()
    async for chunk in ex.chunks():
        body.extend(chunk)
        if len(body) > limit:
            raise PayloadTooLarge(f"the function's answer is larger than this gateway's "
                                  f"limit of {limit} bytes for a stored result "
                                  "(max_body_bytes)", field="result")
    return bytes(body)


async def finish_exchange(opening: asyncio.Future[Exchange], limit: int) -> Outcome:
    """The outcome of a call whose exchange is being opened."""
    start = ""
    try:
        ex = await opening
        start = ex.start
        async with ex:
            body = await read_capped(ex, limit)
            # invoke.py imports this module: the import is here to keep the cycle out.
            from thaw.gateway.invoke import answer_headers

            return dataclasses.replace(
                answer_outcome(ex.status, ex.content_type, body, ex.start),
                headers=tuple(answer_headers(ex, True).items()))
    except ThawError as exc:
        return error_outcome(exc, start)


def completion(invocation_id: str, gateway_id: str, outcome: Outcome, ttl: float,
               webhook_claim_seconds: float = 0.0
               ) -> invocations_pb2.CompleteInvocationRequest:
    return invocations_pb2.CompleteInvocationRequest(
        id=invocation_id, gateway_id=gateway_id,
        state="succeeded" if outcome.succeeded else "failed",
        result_status=outcome.status, result_content_type=outcome.content_type,
        result_body=outcome.body, error_code=outcome.error_code,
        error_message=outcome.error_message, start=outcome.start, ttl_seconds=ttl,
        webhook_claim_seconds=webhook_claim_seconds)


def call_of(inv: invocations_pb2.Invocation) -> Call:
    try:
        headers = {str(k): str(v) for k, v in json.loads(inv.headers_json or "{}").items()}
    except (ValueError, AttributeError):
        headers = {}
    return Call(tenant=inv.tenant, name=inv.function, path=inv.path, body=inv.body,
                headers=headers, request_id=inv.id,
                timeout=inv.timeout_seconds or None,
                received=asyncio.get_running_loop().time(), key_id=inv.key_id,
                priority=inv.priority or PRIORITY_DEFAULT)


# ---- the worker: claims queued invocations, runs them, delivers webhooks ------------------

class InvocationRunner:
    """One per gateway replica. Runs invocations it claimed (queued ones) or adopted
    (sync calls past the wait limit, first requests with an Idempotency-Key), renews
    their claims while they run, and wakes local waiters when they finish. Delivers
    the webhooks of those it finished, and of others whose replica died."""

    def __init__(self, gw: Gateway, client: InvocationsClient,
                 session: aiohttp.ClientSession) -> None:
        self.gw = gw
        self.client = client
        self.session = session
        self.config: GatewaySettings = gw.config
        self.id = f"gw_{uuid.uuid4().hex[:16]}"
        self.running: dict[str, asyncio.Task[None]] = {}
        self.done_events: dict[str, asyncio.Event] = {}
        self.cut: set[str] = set()
        """Invocations cancelled by a client: their task ends without a result."""
        self.wake = asyncio.Event()
        self.background: set[asyncio.Task[None]] = set()
        self.delivering: dict[str, asyncio.Task[None]] = {}
        """Webhooks this replica holds the claim of, by invocation id."""

    # -- running

    def adopt(self, invocation_id: str, outcome: asyncio.Future[Outcome]) -> None:
        """Run to its end a call this replica started, storing its outcome."""
        self.done_events.setdefault(invocation_id, asyncio.Event())
        self.running[invocation_id] = asyncio.get_running_loop().create_task(
            self._finish(invocation_id, outcome))

    def run_claimed(self, inv: invocations_pb2.Invocation) -> None:
        outcome = asyncio.ensure_future(finish_exchange(
            asyncio.ensure_future(self.gw.dispatcher.open(call_of(inv))),
            self.config.max_body_bytes))
        self.adopt(inv.id, outcome)

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
        for attempt in range(5):
            try:
                return await self.client.complete(request)
            except ThawError as exc:
                # The scheduler may be restarting; the result is only in memory here.
                log.warning("storing an invocation's result failed; retrying",
                            invocation=invocation_id, error=exc.message)
                await asyncio.sleep(0.5 * 2 ** attempt)
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
                self._deliver(inv.id, self.deliver_webhook(inv))

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
        await self.deliver_webhook(inv)

    async def deliver_webhook(self, inv: invocations_pb2.Invocation) -> None:
        """Deliver a webhook this replica holds the claim of, from the attempts already
        made (by this replica or one that died) up to webhook_attempts, with
        exponential backoff; each outcome is recorded (extending the claim)."""
        invocation_id = inv.id
        payload = invocation_json(inv)
        attempts, error = inv.webhook_attempts, inv.webhook_error
        limit = self.config.webhook_attempts
        while attempts < limit:
            attempts += 1
            try:
                await self._post_webhook(inv.webhook_url, payload, invocation_id)
            except Exception as exc:  # the receiver's answer, or no answer at all
                error = (str(exc) or type(exc).__name__)[:WEBHOOK_ERROR_CHARS]
                log.info("webhook delivery failed", invocation=invocation_id,
                         attempt=attempts, error=error)
                if attempts >= limit:
                    break
                backoff = min(self.config.webhook_backoff_seconds * 2 ** (attempts - 1),
                              WEBHOOK_MAX_BACKOFF_SECONDS)
                if not await self._record_webhook(invocation_id, "pending", attempts,
                                                  error, backoff):
                    return
                await asyncio.sleep(backoff)
                continue
            await self._record_webhook(invocation_id, "delivered", attempts, "")
            return
        await self._record_webhook(invocation_id, "failed", attempts, error)
        log.warning("webhook not delivered", invocation=invocation_id,
                    attempts=attempts, error=error)

    async def _record_webhook(self, invocation_id: str, state: str, attempts: int,
                              error: str, retry_in: float = 0.0) -> bool:
        """False when another replica holds the delivery now: this one stops."""
        try:
            inv = await self.client.record_webhook(
                invocation_id, state, attempts, error, gateway_id=self.id,
                retry_in=retry_in, claim_seconds=self.config.invocation_claim_seconds)
        except ThawError as exc:
            # The scheduler is away: go on; the renewals decide whether we still hold it.
            log.warning("recording a webhook attempt failed", invocation=invocation_id,
                        error=exc.message)
            return True
        if state == "pending" and inv.webhook_claimed_by != self.id:
            # Taken over (this replica was too slow to renew), or given up (expired).
            log.info("webhook delivery no longer ours", invocation=invocation_id,
                     by=inv.webhook_claimed_by, state=inv.webhook_state)
            return False
        return True

    async def _post_webhook(self, url: str, payload: dict[str, Any], invocation_id: str
                            ) -> None:
        timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_SECONDS)
        async with self.session.post(url, json=payload, timeout=timeout, headers={
                INVOCATION_HEADER: invocation_id}, allow_redirects=False) as resp:
            if not 200 <= resp.status < 300:
                raise RuntimeError(f"the receiver answered {resp.status}")


RUNNER_KEY = web.AppKey("invocation_runner", InvocationRunner)


# ---- JSON views ---------------------------------------------------------------------

def invocation_url(invocation_id: str) -> str:
    return f"/v1/invocations/{invocation_id}"


def _time(value: float) -> float | None:
    return value or None


def invocation_json(inv: invocations_pb2.Invocation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": inv.id, "function": inv.function, "status": inv.state,
        "priority": inv.priority, "url": invocation_url(inv.id),
        "result_url": invocation_url(inv.id) + "/result",
        "created_at": inv.created_at, "started_at": _time(inv.started_at),
        "finished_at": _time(inv.finished_at), "expires_at": _time(inv.expires_at),
        "timings": {
            "queued_seconds": round((inv.started_at or inv.finished_at or inv.created_at)
                                    - inv.created_at, 6),
            "run_seconds": round(inv.finished_at - inv.started_at, 6)
            if inv.finished_at and inv.started_at else None},
        "start": inv.start or None,
    }
    if inv.idempotency_key:
        out["idempotency_key"] = inv.idempotency_key
    if inv.error_code:
        out["error"] = {"code": inv.error_code, "message": inv.error_message}
    if inv.webhook_url:
        out["webhook"] = {"url": inv.webhook_url, "state": inv.webhook_state or "waiting",
                          "attempts": inv.webhook_attempts,
                          "error": inv.webhook_error or None}
    if inv.state in ("succeeded", "failed"):
        out["result_status"] = inv.result_status
        out["result_content_type"] = inv.result_content_type
        out["result_bytes"] = inv.result_bytes
        if inv.result_body and inv.result_bytes <= INLINE_RESULT_BYTES:
            inline_result(out, inv.result_content_type, inv.result_body)
    return out


def inline_result(out: dict[str, Any], content_type: str, body: bytes) -> None:
    if content_type.split(";")[0].strip().lower() in JSON_TYPES:
        try:
            out["result"] = json.loads(body)
            return
        except ValueError:
            pass
    out["result_base64"] = base64.b64encode(body).decode()


# ---- the function URL's part: async, wait limit, idempotency -------------------------

def parse_prefer(values: list[str]) -> tuple[bool, float | None]:
    """(respond-async asked, wait=N seconds or None) from Prefer headers (RFC 7240)."""
    respond_async, wait = False, None
    for value in values:
        for pref in value.split(","):
            token, _, arg = pref.split(";")[0].strip().partition("=")
            token = token.strip().lower()
            if token == "respond-async":
                respond_async = True
            elif token == "wait":
                try:
                    seconds = float(arg.strip().strip('"'))
                except ValueError:
                    continue
                if math.isfinite(seconds) and seconds >= 0:
                    wait = seconds
    return respond_async, wait


def webhook_of(request: web.Request) -> str:
    url = request.headers.get(WEBHOOK_HEADER) or request.query.get("webhook", "")
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # "http://[": not a URL at all
        hostname = None
    if len(url) > MAX_WEBHOOK_CHARS or not hostname or parts.scheme not in (
            "http", "https"):
        raise InvalidArgument(f"the webhook must be an http(s) URL of at most "
                              f"{MAX_WEBHOOK_CHARS} characters, got {url[:100]!r}",
                              field=WEBHOOK_HEADER)
    return url


def idempotency_key_of(request: web.Request) -> str:
    key = request.headers.get(IDEMPOTENCY_HEADER, "")
    if len(key) > MAX_KEY_CHARS or (IDEMPOTENCY_HEADER in request.headers and not key.strip()):
        raise InvalidArgument(f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_KEY_CHARS} "
                              "characters", field=IDEMPOTENCY_HEADER)
    return key


def digest_of(call: Call) -> str:
    h = hashlib.sha256()
    for part in (call.name.encode(), call.path.encode(),
                 call.headers.get("Content-Type", "").encode(), call.body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def record_of(call: Call, p: scheduler_pb2.Principal, webhook: str, key: str
              ) -> invocations_pb2.Invocation:
    return invocations_pb2.Invocation(
        id=f"inv_{uuid.uuid4().hex}", tenant=call.tenant, function=call.name,
        priority=call.priority, path=call.path, body=call.body,
        content_type=call.headers.get("Content-Type", ""),
        headers_json=json.dumps(call.headers), timeout_seconds=call.timeout or 0.0,
        webhook_url=webhook, idempotency_key=key, request_digest=digest_of(call),
        key_id=p.key_id)


def accepted(inv: invocations_pb2.Invocation, status: int = 202) -> web.Response:
    """202 (async) or 303 (sync past the wait limit: see the result URL)."""
    url = invocation_url(inv.id)
    body = {"id": inv.id, "status": inv.state, "url": url, "result_url": url + "/result"}
    location = url if status == 202 else url + "/result"
    return web.json_response(body, status=status, headers={
        "Location": location, INVOCATION_HEADER: inv.id})


def stored_answer(inv: invocations_pb2.Invocation) -> web.Response:
    """An invocation's stored result, as the function answered it."""
    if inv.state == "cancelled":
        raise InvocationCancelled(f"invocation {inv.id} was cancelled; it has no result",
                                  field="id")
    if inv.state == "expired":
        raise expired(inv.id)
    headers = {INVOCATION_HEADER: inv.id}
    if inv.result_content_type:
        headers["Content-Type"] = inv.result_content_type
    if inv.start:
        headers["X-Thaw-Start"] = inv.start
    return web.Response(status=inv.result_status or 200, body=inv.result_body,
                        headers=headers)


def expired(invocation_id: str) -> InvocationExpired:
    return InvocationExpired(f"invocation {invocation_id} has expired: its result was "
                             "kept for result_ttl_seconds and then deleted", field="id")


async def intercept(request: web.Request, gw: Gateway, p: scheduler_pb2.Principal,
                    call: Call) -> web.StreamResponse | None:
    """Answer a function-URL request that needs a stored invocation; None = plain
    sync or streaming call: the caller relays it (see `relay_within_limit`)."""
    runner = request.app[RUNNER_KEY]
    respond_async, wait = parse_prefer(request.headers.getall("Prefer", []))
    key = idempotency_key_of(request)
    webhook = webhook_of(request)
    streaming = "text/event-stream" in call.headers.get("Accept", "")
    limit = gw.config.sync_wait_seconds if wait is None else min(
        wait, gw.config.sync_wait_seconds)
    late_status = 202 if respond_async else 303
    if not respond_async and not key and not webhook:
        return None
    if streaming and not respond_async:
        return None  # streams are relayed, never stored (Idempotency-Key: retry only)
    record = record_of(call, p, webhook, key)
    if respond_async and wait is None:
        inv, created = await runner.client.create(record)
        if not created:
            check_same_request(inv, record)
        runner.wake.set()
        return accepted(inv)
    inv, created = await runner.client.create(
        record, runner.id, gw.config.invocation_claim_seconds)
    if not created:
        check_same_request(inv, record)
        inv = await runner.wait_finished(call.tenant, inv.id, limit)
        if inv.state in ("queued", "running"):
            return accepted(inv, late_status)
        return stored_answer(await runner.client.get(call.tenant, inv.id, with_bodies=True))
    call = dataclasses.replace(call, request_id=inv.id)
    outcome = asyncio.ensure_future(finish_exchange(
        asyncio.ensure_future(gw.dispatcher.open(call)), gw.config.max_body_bytes))
    runner.adopt(inv.id, outcome)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit):
            await asyncio.shield(outcome)
    if not outcome.done():
        return accepted(inv, late_status)
    result = outcome.result()
    headers = {**dict(result.headers), INVOCATION_HEADER: inv.id}
    if result.content_type:
        headers["Content-Type"] = result.content_type
    if result.start:
        headers["X-Thaw-Start"] = result.start
    return web.Response(status=result.status, body=result.body, headers=headers)


def check_same_request(found: invocations_pb2.Invocation,
                       asked: invocations_pb2.Invocation) -> None:
    if found.request_digest != asked.request_digest:
        raise IdempotencyKeyReused(
            f"{IDEMPOTENCY_HEADER} {asked.idempotency_key!r} was used for a different "
            f"request (invocation {found.id}); use a new key for a new request",
            field=IDEMPOTENCY_HEADER)


async def relay_within_limit(request: web.Request, gw: Gateway, p: scheduler_pb2.Principal,
                             call: Call, relay: Any) -> web.StreamResponse:
    """A plain sync call: relayed as usual if its answer starts within the wait limit;
    else it becomes a stored invocation and the client gets 303 to its result."""
    runner = request.app[RUNNER_KEY]
    _, wait = parse_prefer(request.headers.getall("Prefer", []))
    limit: float | None = gw.config.sync_wait_seconds if wait is None else min(
        wait, gw.config.sync_wait_seconds)
    if "text/event-stream" in call.headers.get("Accept", ""):
        limit = None  # a stream is relayed as it comes, however long it takes
    opening = asyncio.ensure_future(gw.dispatcher.open(call))
    try:
        done = await _done_within(opening, limit)
    except asyncio.CancelledError:
        opening.cancel()
        raise
    if done:
        async with opening.result() as ex:
            request[START_KEY] = ex.start
            return await relay(request, ex)  # type: ignore[no-any-return]
    record = record_of(call, p, "", "")
    try:
        inv, _ = await runner.client.create(record, runner.id,
                                            gw.config.invocation_claim_seconds)
    except BaseException:
        opening.cancel()
        raise
    runner.adopt(inv.id, asyncio.ensure_future(
        finish_exchange(opening, gw.config.max_body_bytes)))
    return accepted(inv, 303)


async def _done_within(task: asyncio.Future[Any], limit: float | None) -> bool:
    """Whether `task` is done within `limit` seconds (None: waits for it); it is not
    cancelled. asyncio.wait does the same for a set of futures at about twice the
    cost, and this runs on every sync call."""
    if task.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(limit, wake) if limit is not None else None
    task.add_done_callback(wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        task.remove_done_callback(wake)
    return task.done()


# ---- management routes ------------------------------------------------------------------

async def _principal(request: web.Request) -> scheduler_pb2.Principal:
    gw = request.app[GATEWAY_KEY]
    p = await gw.auth.principal(request.headers.get("Authorization", ""))
    require(p, "invoke")
    return p


def _id(request: web.Request) -> str:
    invocation_id = request.match_info["id"]
    if not invocation_id.startswith("inv_") or len(invocation_id) > 64:
        raise NotFound(f"invocation {invocation_id[:80]} not found", field="id")
    return invocation_id


async def get_invocation(request: web.Request) -> web.Response:
    p = await _principal(request)
    inv = await request.app[RUNNER_KEY].client.get(p.tenant, _id(request), with_bodies=True)
    if inv.state == "expired":
        raise expired(inv.id)
    return web.json_response(invocation_json(inv))


async def get_result(request: web.Request) -> web.Response:
    p = await _principal(request)
    gw, runner = request.app[GATEWAY_KEY], request.app[RUNNER_KEY]
    _, wait = parse_prefer(request.headers.getall("Prefer", []))
    limit = gw.config.sync_wait_seconds if wait is None else min(
        wait, gw.config.sync_wait_seconds)
    inv = await runner.wait_finished(p.tenant, _id(request), limit)
    if inv.state in ("queued", "running"):
        # Still running: come back (a client following redirects waits again).
        return accepted(inv, 303)
    return stored_answer(await runner.client.get(p.tenant, inv.id, with_bodies=True))


async def cancel_invocation(request: web.Request) -> web.Response:
    p = await _principal(request)
    gw, runner = request.app[GATEWAY_KEY], request.app[RUNNER_KEY]
    before = await runner.client.get(p.tenant, _id(request))
    if before.state == "expired":
        raise expired(before.id)
    inv = await runner.client.cancel(p.tenant, before.id, gw.config.result_ttl_seconds)
    if inv.state != "cancelled":
        raise InvocationFinished(f"invocation {inv.id} already {inv.state}; it cannot be "
                                 "cancelled", field="id")
    # Cut it now if it runs here; another replica cuts it when it renews its claim.
    runner.cancel_local(inv.id)
    return web.json_response(invocation_json(inv))


MAX_LIST = 1000


async def list_invocations(request: web.Request) -> web.Response:
    p = await _principal(request)
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise InvalidArgument("limit must be an integer", field="limit") from None
    if not 1 <= limit <= MAX_LIST:
        raise InvalidArgument(f"limit must be in [1, {MAX_LIST}]", field="limit")
    found = await request.app[RUNNER_KEY].client.list_recent(
        p.tenant, limit, request.query.get("status", ""), request.query.get("function", ""))
    return web.json_response({"invocations": [invocation_json(i) for i in found]})


# ---- lifecycle ------------------------------------------------------------------------

async def _worker(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY_KEY]
    session = aiohttp.ClientSession()
    runner = InvocationRunner(gw, InvocationsClient(gw.scheduler.channel), session)
    app[RUNNER_KEY] = runner
    loops = [asyncio.get_running_loop().create_task(coro) for coro in (
        runner.claim_forever(), runner.renew_forever(), runner.sweep_forever(),
        runner.webhooks_forever())]
    yield
    for task in loops:
        task.cancel()
    for task in loops:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await runner.close()
    await session.close()


def add_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(_worker)
    app.router.add_get("/v1/invocations", list_invocations)
    app.router.add_get("/v1/invocations/{id}", get_invocation)
    app.router.add_get("/v1/invocations/{id}/result", get_result)
    app.router.add_post("/v1/invocations/{id}/cancel", cancel_invocation)


# ---- OpenAPI --------------------------------------------------------------------------

def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}


ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
PREFER_PARAM = {"name": "Prefer", "in": "header", "required": False,
                "description": "`wait=N`: wait at most N seconds (capped by the gateway's "
                               "sync_wait_seconds).", "schema": {"type": "string"}}
INVOCATION_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "id": {"type": "string"}, "function": {"type": "string"},
    "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed",
                                          "cancelled", "expired"]},
    "url": {"type": "string"}, "result_url": {"type": "string"},
    "result": {}, "result_base64": {"type": "string"},
    "result_status": {"type": "integer"}, "error": {"type": "object"}}}
COMMON_ERRORS = {"401": _error("No API key, or an unknown one."),
                 "403": _error("The API key lacks the invoke scope."),
                 "404": _error("No such invocation for this key's tenant.")}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/invocations": {"get": {
        "summary": "The tenant's recent invocations (stored ones: async, past the wait "
                   "limit, or with an Idempotency-Key), newest first.",
        "parameters": [
            {"name": "limit", "in": "query", "schema": {
                "type": "integer", "minimum": 1, "maximum": MAX_LIST, "default": 100}},
            {"name": "status", "in": "query", "schema": {"type": "string", "enum": [
                "queued", "running", "succeeded", "failed", "cancelled", "expired"]}},
            {"name": "function", "in": "query", "schema": {"type": "string"}}],
        "responses": {
            "200": {"description": "Invocations, without their results.",
                    "content": {"application/json": {"schema": {
                        "type": "object", "properties": {"invocations": {
                            "type": "array", "items": INVOCATION_SCHEMA}}}}}},
            "400": _error("A bad limit or status."),
            "401": COMMON_ERRORS["401"], "403": COMMON_ERRORS["403"]}}},
    "/v1/invocations/{id}": {"get": {
        "summary": "An invocation's status, timings and result (JSON inline, other "
                   "content as result_base64; large ones only through result_url).",
        "parameters": [ID_PARAM],
        "responses": {
            "200": {"description": "The invocation.", "content": {"application/json": {
                "schema": INVOCATION_SCHEMA}}},
            **COMMON_ERRORS,
            "410": _error("The invocation expired (result_ttl_seconds).")}}},
    "/v1/invocations/{id}/result": {"get": {
        "summary": "The invocation's result as the function answered it (status, "
                   "content type, body); waits for it up to the sync wait limit.",
        "parameters": [ID_PARAM, PREFER_PARAM],
        "responses": {
            "200": {"description": "The function's answer (any status it gave).",
                    "content": {"*/*": {"schema": {}}}},
            "303": {"description": "Still running: see this URL again.",
                    "headers": {"Location": {"schema": {"type": "string"}}}},
            **COMMON_ERRORS,
            "409": _error("The invocation was cancelled."),
            "410": _error("The invocation expired (result_ttl_seconds).")}}},
    "/v1/invocations/{id}/cancel": {"post": {
        "summary": "Cancel an invocation: a queued one at once, a running one is cut.",
        "parameters": [ID_PARAM],
        "responses": {
            "200": {"description": "The cancelled invocation.",
                    "content": {"application/json": {"schema": INVOCATION_SCHEMA}}},
            **COMMON_ERRORS,
            "409": _error("The invocation already finished."),
            "410": _error("The invocation expired (result_ttl_seconds).")}}},
}
