"""When a request is sent again: on 429 and 503 (honouring Retry-After) and on a
connection that could not be opened, within a bounded number of attempts and seconds.

A request that may have run is never sent twice. GET, HEAD, OPTIONS, PUT and DELETE are
idempotent and always may be. A POST (a function call, a deploy) is sent again only
when nothing ran: the connection was never opened, or the 429/503 is the platform's own
refusal. The gateway refuses before any instance is touched (rate limits, shedding,
quota, an open circuit, no capacity); every answer an instance gave carries
X-Thaw-Start (gateway/relay.py), so a 429/503 without it and with the platform's error
body is a refusal, and one with it is the function's own answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import tenacity

from thaw.client.errors import ThawError, error_body

IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE"))
RETRY_STATUSES = frozenset((429, 503))
# Set on every answer an instance gave (the platform's own refusals lack it).
INSTANCE_ANSWER_HEADER = "X-Thaw-Start"
# Set on an error a handler raised on purpose (an answer of the function, not a refusal).
TENANT_ERROR_HEADER = "X-Thaw-Error"

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """At most `attempts` tries in all, none starting past `budget` seconds after the
    first: a Retry-After that would end past the budget is not waited for, the error
    is raised at once. Without Retry-After the waits double from `backoff`."""

    attempts: int = 4
    budget: float = 60.0
    backoff: float = 0.5
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    async_sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep,
                                                            compare=False)


NO_RETRY = RetryPolicy(attempts=1)


def replayable(content: Any) -> bool:
    """Whether a request body can be sent a second time (an iterator cannot)."""
    return content is None or isinstance(content, bytes | str)


def refused_by_platform(resp: httpx.Response) -> bool:
    """A 429/503 the platform answered before running anything (module docstring)."""
    if INSTANCE_ANSWER_HEADER in resp.headers or TENANT_ERROR_HEADER in resp.headers:
        return False
    try:
        return bool(error_body(resp.json())[0])
    except ValueError:
        return False


def mark_retryable(exc: ThawError, method: str, resp: httpx.Response | None,
                   replay: bool) -> ThawError:
    """Set `exc.retryable` for an error answer (`resp`) or a connection never opened
    (`resp` None)."""
    if not replay:
        return exc
    if resp is None:
        exc.retryable = True
    elif resp.status_code in RETRY_STATUSES:
        exc.retryable = method.upper() in IDEMPOTENT or refused_by_platform(resp)
    return exc


def _wait_for(exc: BaseException | None, attempt: int, policy: RetryPolicy) -> float:
    if isinstance(exc, ThawError) and exc.retry_after is not None:
        return exc.retry_after
    return float(policy.backoff * 2 ** (attempt - 1))


def _kwargs(policy: RetryPolicy) -> dict[str, Any]:
    def stop(state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= policy.attempts:
            return True
        exc = state.outcome.exception() if state.outcome else None
        pause = _wait_for(exc, state.attempt_number, policy)
        return (state.seconds_since_start or 0.0) + pause > policy.budget

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return _wait_for(exc, state.attempt_number, policy)

    def retry(exc: BaseException) -> bool:
        return isinstance(exc, ThawError) and exc.retryable

    return {"stop": stop, "wait": wait, "retry": tenacity.retry_if_exception(retry),
            "reraise": True}


def call(policy: RetryPolicy, attempt: Callable[[], T]) -> T:
    """`attempt()`, again while it raises a retryable ThawError and the policy allows."""
    retrying = tenacity.Retrying(sleep=policy.sleep, **_kwargs(policy))
    return retrying(attempt)


async def acall(policy: RetryPolicy, attempt: Callable[[], Awaitable[T]]) -> T:
    """`await attempt()`, as `call`."""
    retrying = tenacity.AsyncRetrying(sleep=policy.async_sleep, **_kwargs(policy))
    return await retrying(attempt)
