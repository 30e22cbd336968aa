"""Webhook delivery: the finished invocation POSTed as JSON to the URL given at
submission, retried with exponential backoff (tenacity) up to webhook_attempts.

A delivery is claimed like an invocation: the replica delivering it records each
attempt (extending its claim); a replica that finds the claim held by another one
stops, and one whose replica died is taken over, counting the attempts made."""

from __future__ import annotations

from typing import Any

import aiohttp
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
)

from thaw.core.errors import ThawError
from thaw.gateway.config import GatewaySettings
from thaw.gateway.request import INVOCATION_HEADER
from thaw.gateway.stored.client import InvocationsClient
from thaw.gateway.stored.views import invocation_json
from thaw.proto import invocations_pb2

log = structlog.get_logger()

# Each webhook delivery attempt waits this long for the receiver's answer.
WEBHOOK_TIMEOUT_SECONDS = 10.0
WEBHOOK_MAX_BACKOFF_SECONDS = 300.0
# What a failed attempt records of its error.
WEBHOOK_ERROR_CHARS = 500


class _NotOurs(Exception):
    """Another replica holds the delivery now (or it was given up): stop."""


def _error_of(state: RetryCallState) -> str:
    return _described(state.outcome.exception() if state.outcome is not None else None)


def _described(exc: BaseException | None) -> str:
    return (str(exc) or type(exc).__name__)[:WEBHOOK_ERROR_CHARS]


class Webhooks:
    """Delivers the webhooks this replica holds the claims of."""

    def __init__(self, client: InvocationsClient, gateway_id: str,
                 config: GatewaySettings, session: aiohttp.ClientSession) -> None:
        self.client = client
        self.id = gateway_id
        self.config = config
        self.session = session

    async def deliver(self, inv: invocations_pb2.Invocation) -> None:
        """Deliver a webhook this replica holds the claim of, from the attempts already
        made (by this replica or one that died) up to webhook_attempts, with
        exponential backoff; each outcome is recorded (extending the claim)."""
        invocation_id = inv.id
        made, error = inv.webhook_attempts, inv.webhook_error
        limit = self.config.webhook_attempts
        tries = made
        if made < limit:
            payload = invocation_json(inv)
            first = self.config.webhook_backoff_seconds

            async def post() -> None:
                nonlocal tries
                tries += 1
                await self._post(inv.webhook_url, payload, invocation_id)

            def backoff(state: RetryCallState) -> float:
                return float(min(first * 2 ** (tries - 1), WEBHOOK_MAX_BACKOFF_SECONDS))

            def failed(state: RetryCallState) -> None:
                log.info("webhook delivery failed", invocation=invocation_id,
                         attempt=tries, error=_error_of(state))

            async def pending(state: RetryCallState) -> None:
                if not await self._record(invocation_id, "pending", tries,
                                          _error_of(state), state.upcoming_sleep):
                    raise _NotOurs

            retrying = AsyncRetrying(
                # Whatever the receiver answered, or no answer at all.
                retry=retry_if_exception_type(Exception),
                stop=stop_after_attempt(limit - made), wait=backoff, after=failed,
                before_sleep=pending)
            try:
                await retrying(post)
            except _NotOurs:
                return
            except RetryError as exc:
                error = _described(exc.last_attempt.exception())
            else:
                await self._record(invocation_id, "delivered", tries, "")
                return
        await self._record(invocation_id, "failed", tries, error)
        log.warning("webhook not delivered", invocation=invocation_id,
                    attempts=tries, error=error)

    async def _record(self, invocation_id: str, state: str, attempts: int, error: str,
                      retry_in: float = 0.0) -> bool:
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

    async def _post(self, url: str, payload: dict[str, Any], invocation_id: str) -> None:
        timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_SECONDS)
        async with self.session.post(url, json=payload, timeout=timeout, headers={
                INVOCATION_HEADER: invocation_id}, allow_redirects=False) as resp:
            if not 200 <= resp.status < 300:
                raise RuntimeError(f"the receiver answered {resp.status}")
