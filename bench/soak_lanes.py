"""The clients of `thaw bench soak` (bench/soak.py): the valid calls, the lanes that mix
them with bad input (bench/soak_inputs.py), and the tally of what each got."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from thaw.bench.soak_inputs import Attempt, Target

# Valid calls per bad input in the mixed lanes: mostly valid traffic, as in production.
VALID_PER_BAD = 3
VALID_TIMEOUT_S = 60.0
ERROR_PAUSE_S = 0.1


@dataclass
class Tally:
    """Every call's outcome: valid calls by status and function, bad input by kind."""

    valid: Counter[str] = field(default_factory=Counter)
    valid_errors: Counter[str] = field(default_factory=Counter)
    """Valid calls not answered 200: "<status> <error code>" (the gateway's JSON error)."""
    valid_by_function: dict[str, Counter[str]] = field(default_factory=dict)
    bad: dict[str, Counter[str]] = field(default_factory=dict)

    def bad_result(self, kind: str, status: str) -> None:
        self.bad.setdefault(kind, Counter())[status] += 1

    def valid_result(self, function: str, status: str) -> None:
        self.valid[status] += 1
        self.valid_by_function.setdefault(function, Counter())[status] += 1


def _error_code(body: bytes) -> str:
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "-"
    return str(code)


class Valid:
    """The valid calls: each function with a payload and the answer it must give."""

    def __init__(self, session: aiohttp.ClientSession, base: str, tenant: str,
                 echo: str) -> None:
        self.session = session
        self.base = base
        self.tenant = tenant
        self.echo = echo
        self.turn = 0

    async def call(self, tally: Tally) -> None:
        self.turn += 1
        n = self.turn
        payload: dict[str, object]
        expect: tuple[str, object]
        if n % 2:
            name, payload, expect = self.echo, {"n": n}, ("echo", {"n": n})
        else:
            name, payload, expect = "soak-sum", {"numbers": [n, 1, 2]}, ("sum", n + 3)
        try:
            async with self.session.post(f"{self.base}/fn/{self.tenant}/{name}",
                                         json=payload) as resp:
                status = str(resp.status)
                if resp.status == 200:
                    body = await resp.json(content_type=None)
                    if not isinstance(body, dict) or body.get(expect[0]) != expect[1]:
                        status = "200_wrong_answer"
                else:
                    tally.valid_errors[f"{status} {_error_code(await resp.read())}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = f"error_{type(exc).__name__}"
            # A gateway that is down refuses at once: do not spin on the shared cores.
            await asyncio.sleep(ERROR_PAUSE_S)
        tally.valid_result(name, status)


async def mixed_lane(valid: Valid, kinds: dict[str, Attempt], target: Target,
                      tally: Tally, deadline: float, schedule: itertools.cycle[str],
                      tried: set[str]) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < deadline or tried != set(kinds):
        for _ in range(VALID_PER_BAD):
            await valid.call(tally)
        kind = next(schedule)
        tried.add(kind)
        tally.bad_result(kind, await kinds[kind](target))


async def serial_lane(kinds: dict[str, Attempt], target: Target, tally: Tally,
                       deadline: float, tried: set[str], *, gap: float = 0.0,
                       reserve: float = 0.0, start: int = 0) -> None:
    """One kind after another, from `start` in the order of `kinds`, at least `gap`
    seconds apart. Kinds no lane sharing `tried` has tried yet go first, whatever the
    time; after them a new attempt starts only when it can end by the deadline
    (`reserve`: the longest one attempt takes)."""
    loop = asyncio.get_running_loop()
    order = list(kinds)
    order = order[start % len(order):] + order[:start % len(order)]
    for turn in itertools.count():
        untried = [k for k in order if k not in tried]
        if untried:
            kind = untried[0]
        elif loop.time() + reserve < deadline:
            kind = order[turn % len(order)]
        else:
            return
        tried.add(kind)
        began = loop.time()
        tally.bad_result(kind, await kinds[kind](target))
        await asyncio.sleep(max(0.0, gap - (loop.time() - began)))
