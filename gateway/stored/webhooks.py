"""Webhook delivery: the finished invocation POSTed as JSON to the URL given at
submission, signed (Standard Webhooks: stored/signing.py, with the tenant's secret),
retried with exponential backoff (tenacity) up to webhook_attempts.

Before each attempt the URL's host is resolved and checked again (stored/targets.py)
and the connection goes to the address that was checked, never to a second lookup's.
A refused address ends the delivery at once; what is recorded for the tenant says
only "not allowed", "could not be reached" or the receiver's status, never which
rule or which network error (no probing of ports through webhooks).

A delivery is claimed like an invocation: the replica delivering it records each
attempt (extending its claim); a replica that finds the claim held by another one
stops, and one whose replica died is taken over, counting the attempts made."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import aiohttp
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_not_exception_type,
    stop_after_attempt,
)

from thaw.core.errors import ThawError
from thaw.gateway.config import GatewaySettings
from thaw.gateway.request import INVOCATION_HEADER
from thaw.gateway.stored.client import InvocationsClient
from thaw.gateway.stored.result_files import Links
from thaw.gateway.stored.signing import signed_headers
from thaw.gateway.stored.targets import NOT_ALLOWED, WebhookGuard, WebhookNotAllowed
from thaw.gateway.stored.views import invocation_json
from thaw.proto import invocations_pb2

log = structlog.get_logger()

# Each webhook delivery attempt waits this long for the receiver's answer.
WEBHOOK_TIMEOUT_SECONDS = 10.0
WEBHOOK_MAX_BACKOFF_SECONDS = 300.0
# What a failed attempt records of its error.
WEBHOOK_ERROR_CHARS = 500


UNREACHABLE = "the receiver could not be reached"
NO_SECRET = "the webhook signing secret could not be read; retrying"
DELIVERY_FAILED = "the delivery failed"


class _NotOurs(Exception):
    """Another replica holds the delivery now (or it was given up): stop."""


class _AttemptFailed(Exception):
    """One attempt failed; its message is what the tenant sees."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _error_of(state: RetryCallState) -> str:
    return _described(state.outcome.exception() if state.outcome is not None else None)


def _described(exc: BaseException | None) -> str:
    return (str(exc) or type(exc).__name__)[:WEBHOOK_ERROR_CHARS]


class Webhooks:
    """Delivers the webhooks this replica holds the claims of."""

    def __init__(self, client: InvocationsClient, gateway_id: str,
                 config: GatewaySettings, session: aiohttp.ClientSession,
                 guard: WebhookGuard | None = None,
                 clock: Callable[[], float] = time.time,
                 links: Callable[[], Links | None] = lambda: None) -> None:
        self.client = client
        self.id = gateway_id
        self.config = config
        self.session = session
        """Its connector must not pool connections (delivery_session): a kept
        connection to an address could carry another host's request."""
        self.guard = guard or WebhookGuard(config.webhook_allow)
        self.clock = clock
        self.links = links
        """Mints the URLs of a result's files (result_files.py), fresh per delivery."""

    async def deliver(self, inv: invocations_pb2.Invocation) -> None:
        """Deliver a webhook this replica holds the claim of, from the attempts already
        made (by this replica or one that died) up to webhook_attempts, with
        exponential backoff; each outcome is recorded (extending the claim)."""
        invocation_id = inv.id
        made, error = inv.webhook_attempts, inv.webhook_error
        limit = self.config.webhook_attempts
        tries, status = made, inv.webhook_last_status
        if made < limit:
            body = json.dumps(invocation_json(inv, self.links())).encode()
            first = self.config.webhook_backoff_seconds

            async def post() -> None:
                nonlocal tries, status
                tries += 1
                status = 0
                try:
                    status = await self._post(inv, body)
                except _AttemptFailed as exc:
                    status = exc.status
                    raise
                except WebhookNotAllowed:
                    raise
                except Exception as exc:  # a bug: its text is for the log, not the tenant
                    log.exception("webhook attempt failed unexpectedly",
                                  invocation=invocation_id)
                    raise _AttemptFailed(DELIVERY_FAILED) from exc

            def backoff(state: RetryCallState) -> float:
                return float(min(first * 2 ** (tries - 1), WEBHOOK_MAX_BACKOFF_SECONDS))

            def failed(state: RetryCallState) -> None:
                log.info("webhook delivery failed", invocation=invocation_id,
                         attempt=tries, error=_error_of(state))

            async def pending(state: RetryCallState) -> None:
                if not await self._record(invocation_id, "pending", tries,
                                          _error_of(state), status, state.upcoming_sleep):
                    raise _NotOurs

            retrying = AsyncRetrying(
                # Whatever the receiver answered, or no answer at all; an address
                # refused by the deny list is final.
                retry=retry_if_not_exception_type((WebhookNotAllowed, _NotOurs)),
                stop=stop_after_attempt(limit - made), wait=backoff, after=failed,
                before_sleep=pending)
            try:
                await retrying(post)
            except _NotOurs:
                return
            except WebhookNotAllowed:
                error = NOT_ALLOWED
            except RetryError as exc:
                error = _described(exc.last_attempt.exception())
            else:
                await self._record(invocation_id, "delivered", tries, "", status)
                return
        await self._record(invocation_id, "failed", tries, error, status)
        log.warning("webhook not delivered", invocation=invocation_id,
                    attempts=tries, error=error)

    async def _record(self, invocation_id: str, state: str, attempts: int, error: str,
                      last_status: int, retry_in: float = 0.0) -> bool:
        """False when another replica holds the delivery now: this one stops."""
        try:
            inv = await self.client.record_webhook(
                invocation_id, state, attempts, error, gateway_id=self.id,
                retry_in=retry_in, claim_seconds=self.config.invocation_claim_seconds,
                last_status=last_status)
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

    async def signing_secrets(self, tenant: str) -> list[str]:
        """The tenant's secrets that sign a delivery: the current one, and the one
        before a recent rotation."""
        try:
            found = await self.client.webhook_secret(tenant)
        except ThawError as exc:
            log.warning("reading a webhook secret failed", tenant=tenant,
                        error=exc.message)
            raise _AttemptFailed(NO_SECRET) from exc
        return [found.secret, *([found.previous_secret] if found.previous_secret else [])]

    async def _post(self, inv: invocations_pb2.Invocation, body: bytes) -> int:
        """One signed attempt at the checked address; the receiver's status (2xx),
        else _AttemptFailed (WebhookNotAllowed when the address is refused)."""
        target = await self.guard.check(inv.webhook_url)
        keys = await self.signing_secrets(inv.tenant)
        headers = {"Host": target.host_header, "Content-Type": "application/json",
                   INVOCATION_HEADER: inv.id,
                   **signed_headers(keys, inv.id, int(self.clock()), body)}
        timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_SECONDS)
        try:
            async with self.session.post(
                    target.connect_url, data=body, headers=headers, timeout=timeout,
                    allow_redirects=False,
                    server_hostname=target.host if target.scheme == "https" else None
                    ) as resp:
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # Refused, reset, timed out, TLS: all alike to the tenant (the log has it).
            log.info("webhook receiver unreachable", invocation=inv.id,
                     error=type(exc).__name__)
            raise _AttemptFailed(UNREACHABLE) from exc
        if not 200 <= status < 300:
            raise _AttemptFailed(f"the receiver answered {status}", status)
        return status


def delivery_session() -> aiohttp.ClientSession:
    """The session webhooks are sent with: no pooled connections (each attempt
    connects to the address just checked, and a connection kept for one host must not
    serve another that resolved to the same address), no proxy from the environment,
    no cookies kept between receivers."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                 cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
