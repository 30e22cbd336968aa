"""Budgets per API key and per tenant: requests per minute and per day, and tokens
per minute and per day on the OpenAI routes (docs/limits.md).

The budgets come with the key's principal (scheduler/budgets.py, fetched with it and
cached by gateway/auth.py), so a call costs no lookup. Windows are fixed: a minute is
a wall-clock minute, a day a UTC day; past its budget a caller is refused with 429,
`Retry-After` the seconds until the window ends, and the budget's name as `field`.

Requests are counted when admitted, before the call. Tokens are what the function's
answer reports (`usage.prompt_tokens + usage.completion_tokens`, or `total_tokens`),
counted after the call: a call is refused once a token budget is spent, so the call
that crosses it completes and the next is refused.

Minute windows live in this replica's memory, like the per-minute limiter's
(gateway/ratelimit.py): with several replicas each counts what it served. Day windows
are shared: every SYNC_SECONDS each replica adds what it counted to the scheduler's
day totals (scheduler/budgets.py) and takes back every replica's, so a day's budget
holds across replicas and restarts to within what the replicas serve in one sync
interval (docs/limits.md says what holds).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from cachetools import LRUCache

from thaw.core.errors import InvalidArgument, ThawError
from thaw.gateway.errors import RateLimited
from thaw.proto import scheduler_pb2, tenancy_pb2

log = structlog.get_logger()

MINUTE = 60.0
DAY = 86400.0
# Counters kept at once (two per budget per subject); the least recently used beyond
# this start again from zero, which errs on the side of the caller.
MAX_COUNTERS = 200_000
# name -> (window length, what is counted, said in the error)
BUDGETS: dict[str, tuple[float, str, str]] = {
    "rpm": (MINUTE, "requests", "requests per minute"),
    "rpd": (DAY, "requests", "requests per day"),
    "tpm": (MINUTE, "tokens", "tokens per minute"),
    "tpd": (DAY, "tokens", "tokens per day"),
}
REQUEST_BUDGETS = ("rpm", "rpd")
TOKEN_BUDGETS = ("tpm", "tpd")
DAY_BUDGETS = ("rpd", "tpd")
# How often a replica adds its day counts to the scheduler's and takes the totals.
SYNC_SECONDS = 2.0
Sync = Callable[[list[tenancy_pb2.BudgetCount]], Awaitable[list[tenancy_pb2.BudgetCount]]]


class BudgetExceeded(RateLimited):
    """A key or its tenant spent one of its budgets for the current window."""

    code = "budget_exceeded"


@dataclass(frozen=True)
class Subject:
    """Whose budgets: a key (`key:ID`) or a tenant (`tenant:NAME`)."""

    counter: str
    said: str
    budgets: scheduler_pb2.Budgets


def subjects(p: scheduler_pb2.Principal) -> list[Subject]:
    """The principal's key and tenant, each with the budgets it has."""
    found = []
    if p.key_id and p.HasField("key_budgets"):
        found.append(Subject(f"key:{p.key_id}", "this API key", p.key_budgets))
    if p.HasField("tenant_budgets"):
        found.append(Subject(f"tenant:{p.tenant}", f"tenant {p.tenant}", p.tenant_budgets))
    return [s for s in found if any(getattr(s.budgets, b) for b in BUDGETS)]


def window(length: float, now: float) -> tuple[int, float]:
    """The fixed window holding `now`: its index and the seconds until it ends."""
    index = math.floor(now / length)
    return index, (index + 1) * length - now


class _Count:
    """One budget's count in one window: `base` is the total the scheduler last
    answered (every replica's, day windows only), `sending` what this replica has
    sent since and not yet seen answered, `unsent` what it counted after that."""

    __slots__ = ("index", "base", "sending", "unsent", "synced")

    def __init__(self, index: int) -> None:
        self.index = index
        self.base = self.sending = self.unsent = 0
        self.synced = False

    @property
    def total(self) -> int:
        return self.base + self.sending + self.unsent


class BudgetBook:
    """This replica's counts of every budget's current window (day windows joined
    with the other replicas' through `sync`)."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 max_counters: int = MAX_COUNTERS) -> None:
        self.clock = clock
        self._counts: LRUCache[tuple[str, str], _Count] = LRUCache(max_counters)

    def used(self, counter: str, budget: str, now: float | None = None) -> int:
        """What is counted against `budget` of `counter` in the current window."""
        index, _ = window(BUDGETS[budget][0], self.clock() if now is None else now)
        found = self._counts.get((counter, budget))
        return found.total if found is not None and found.index == index else 0

    def _add(self, counter: str, budget: str, amount: int, now: float) -> None:
        index, _ = window(BUDGETS[budget][0], now)
        found = self._counts.get((counter, budget))
        if found is None or found.index < index:
            found = _Count(index)
            self._counts[(counter, budget)] = found
        found.unsent += amount

    async def sync(self, add: Sync) -> None:
        """Send the day counts made since the last sync (and ask the totals of those
        not yet known here); take every replica's totals back. On failure the counts
        are kept for the next try."""
        today, _ = window(DAY, self.clock())
        batch: list[tuple[_Count, int]] = []
        asked: list[tenancy_pb2.BudgetCount] = []
        for (counter, budget), c in list(self._counts.items()):
            if budget not in DAY_BUDGETS or c.index < today - 1 \
                    or (c.synced and not c.unsent):
                continue
            sent, c.sending, c.unsent = c.unsent, c.sending + c.unsent, 0
            batch.append((c, sent))
            asked.append(tenancy_pb2.BudgetCount(counter=counter, budget=budget,
                                                 window=c.index, count=sent))
        if not asked:
            return
        try:
            totals = await add(asked)
        except BaseException:
            for c, sent in batch:
                c.sending -= sent
                c.unsent += sent
            raise
        for (c, sent), total in zip(batch, totals, strict=True):
            c.sending -= sent
            c.base = max(c.base, total.count - c.sending)
            c.synced = True

    async def follow(self, add: Sync,
                     sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Forever: sync every SYNC_SECONDS (started with the gateway)."""
        failing = False
        while True:
            try:
                await self.sync(add)
            except ThawError as exc:
                if not failing:  # once per outage
                    log.warning("budget day counts not shared; this replica counts "
                                "alone until the scheduler answers", error=exc.message)
                failing = True
            else:
                failing = False
            await sleep(SYNC_SECONDS)

    def _refusal(self, s: Subject, budget: str, now: float) -> BudgetExceeded:
        length, _, said = BUDGETS[budget]
        limit = getattr(s.budgets, budget)
        _, left = window(length, now)
        return BudgetExceeded(f"{s.said} is over its budget of {limit} {said} "
                              f"(the window ends in {math.ceil(left)} s)",
                              retry_after=left, field=budget)

    def _refuse_if(self, spent: list[tuple[Subject, str]], now: float) -> None:
        """Refuse naming the spent budget that frees last: its Retry-After is when a
        call can pass them all."""
        if spent:
            raise max((self._refusal(s, b, now) for s, b in spent),
                      key=lambda exc: exc.retry_after)

    def admit(self, p: scheduler_pb2.Principal) -> None:
        """Count one request against the key's and its tenant's request budgets, or
        raise BudgetExceeded (nothing counted) when one is spent."""
        now = self.clock()
        found = subjects(p)
        self._refuse_if([(s, b) for s in found for b in REQUEST_BUDGETS
                         if getattr(s.budgets, b)
                         and self.used(s.counter, b, now) + 1 > getattr(s.budgets, b)], now)
        for s in found:
            for budget in REQUEST_BUDGETS:
                if getattr(s.budgets, budget):
                    self._add(s.counter, budget, 1, now)

    def check_tokens(self, p: scheduler_pb2.Principal) -> None:
        """Raise BudgetExceeded when the key or its tenant spent a token budget."""
        now = self.clock()
        self._refuse_if([(s, b) for s in subjects(p) for b in TOKEN_BUDGETS
                         if getattr(s.budgets, b)
                         and self.used(s.counter, b, now) >= getattr(s.budgets, b)], now)

    def spend(self, p: scheduler_pb2.Principal, tokens: int) -> None:
        """Count the tokens a call used against the key's and its tenant's budgets."""
        if tokens <= 0:
            return
        now = self.clock()
        for s in subjects(p):
            for budget in TOKEN_BUDGETS:
                if getattr(s.budgets, budget):
                    self._add(s.counter, budget, tokens, now)


def usage_tokens(answer: Any) -> int:
    """The tokens an OpenAI answer (or a stream's chunk) reports in `usage`; 0 when
    it reports none."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return 0

    def whole(name: str) -> int:
        value = usage.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) \
            and value > 0 else 0
    parts = whole("prompt_tokens") + whole("completion_tokens")
    return parts or whole("total_tokens")


def budgets_json(b: scheduler_pb2.Budgets) -> dict[str, int | None]:
    """The four budgets as the API shows them (null = none)."""
    return {name: getattr(b, name) or None for name in BUDGETS}


def parse_budgets(body: dict[str, Any], *, required: bool = False
                  ) -> scheduler_pb2.Budgets | None:
    """rpm/rpd/tpm/tpd from a JSON body (null or 0 = none); None when the body names
    none of them (and `required` is false)."""
    if not any(name in body for name in BUDGETS):
        if required:
            raise InvalidArgument("give at least one of rpm, rpd, tpm, tpd", field="body")
        return None
    out = scheduler_pb2.Budgets()
    for name in BUDGETS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) \
                or not 0 <= value <= 2**63 - 1:
            raise InvalidArgument(f"{name} must be a whole number >= 0 (or null: none)",
                                  field=name)
        setattr(out, name, value)
    return out


def counts_tokens(p: scheduler_pb2.Principal) -> bool:
    """Whether the key or its tenant has a token budget (else answers are not read)."""
    return any(getattr(s.budgets, b) for s in subjects(p) for b in TOKEN_BUDGETS)


class StreamTokens:
    """The tokens of an OpenAI stream: its `usage` chunk when the function sends one
    (`stream_options.include_usage`), else one per chunk with choices (servers send a
    token per chunk), so a stream without usage is not free."""

    def __init__(self) -> None:
        self.reported = 0
        self.chunks = 0

    def feed(self, data: str) -> None:
        """One event's data (the JSON of a chunk)."""
        try:
            doc = json.loads(data)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        self.reported = max(self.reported, usage_tokens(doc))
        if doc.get("choices"):
            self.chunks += 1

    @property
    def total(self) -> int:
        return self.reported or self.chunks


def answer_tokens(body: bytes) -> int:
    """The tokens a whole (not streamed) OpenAI answer reports."""
    try:
        return usage_tokens(json.loads(body))
    except ValueError:
        return 0
