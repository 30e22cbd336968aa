"""Failed logins are limited per client address: past the limit, 429 with Retry-After
before any lookup at the scheduler; keys already known keep working from there."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import aiohttp
import httpx
import pytest

from tests.conftest import RunningPlatform
from tests.gateway.conftest import Replica
from thaw.core.errors import Unauthenticated
from thaw.gateway.auth import Authenticator
from thaw.gateway.errors import TooManyFailedLogins
from thaw.gateway.login_guard import FailedLogins
from thaw.proto import scheduler_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingScheduler:
    """Knows one key; counts the lookups it is asked for."""

    def __init__(self, key: str) -> None:
        self.known = hashlib.sha256(key.encode()).hexdigest()
        self.lookups = 0

    async def authenticate(self, digest: str) -> scheduler_pb2.Principal:
        self.lookups += 1
        if digest != self.known:
            raise Unauthenticated("unknown or revoked API key")
        return scheduler_pb2.Principal(tenant="t", key_id="k", scopes=["invoke"])


def test_an_address_over_its_limit_waits_until_its_oldest_failure_leaves() -> None:
    clock = Clock()
    guard = FailedLogins(3, 60.0, clock)
    for _ in range(3):
        guard.check("10.0.0.1")
        guard.failed("10.0.0.1")
        clock.now += 10
    with pytest.raises(TooManyFailedLogins) as refused:
        guard.check("10.0.0.1")
    # The first failure was at 1000, now is 1030: it leaves the window at 1060.
    assert refused.value.retry_after == pytest.approx(30.0)
    guard.check("10.0.0.2")  # another address is not touched
    clock.now = 1060.5
    guard.check("10.0.0.1")  # one failure left the window
    assert not FailedLogins(0, 60.0, clock).enabled


def test_guessing_costs_no_lookup_past_the_limit_and_known_keys_still_work() -> None:
    async def scenario() -> None:
        scheduler = CountingScheduler("good")
        auth = Authenticator(scheduler, FailedLogins(3, 60.0))  # type: ignore[arg-type]
        assert (await auth.principal("Bearer good", "10.0.0.1")).tenant == "t"
        for guess in ("a", "b", "c"):
            with pytest.raises(Unauthenticated):
                await auth.principal(f"Bearer {guess}", "10.0.0.1")
        assert scheduler.lookups == 4
        for guess in ("d", "e", "a"):
            with pytest.raises(TooManyFailedLogins):
                await auth.principal(f"Bearer {guess}", "10.0.0.1")
        assert scheduler.lookups == 4  # refused before any lookup
        # The address's good key (in the cache) is not slowed; other addresses neither.
        assert (await auth.principal("Bearer good", "10.0.0.1")).tenant == "t"
        with pytest.raises(Unauthenticated):
            await auth.principal("Bearer a", "10.0.0.2")
        assert scheduler.lookups == 4  # a key just refused is not asked for again
        # A missing key is no failed login.
        for _ in range(5):
            with pytest.raises(Unauthenticated):
                await auth.principal("", "10.0.0.3")
        with pytest.raises(Unauthenticated):
            await auth.principal("Bearer z", "10.0.0.3")

    asyncio.run(scenario())


async def _dashboard_login(url: str, key: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.ws_connect(
            url.replace("http", "ws", 1) + "/v1/live") as ws:
        await ws.send_json({"key": key})
        msg = await ws.receive(timeout=30)
        answer: dict[str, object] = msg.json()
        return answer


def test_a_replica_refuses_an_address_that_keeps_failing(
        platform: RunningPlatform, replica: Callable[[dict[str, str]], Replica]) -> None:
    gw = replica({"THAW_AUTH_FAILURE_LIMIT": "3", "THAW_AUTH_FAILURE_WINDOW": "600"})
    assert gw.http.get("/v1/functions").status_code == 200  # the good key, now cached
    fresh = platform.http.post("/v1/keys", json={"name": "fresh", "scopes": ["invoke"]})
    assert fresh.status_code == 201
    bad = httpx.Client(base_url=gw.url, headers={"Authorization": "Bearer thaw_guess"})
    for _ in range(2):
        assert bad.get("/v1/functions").status_code == 401
    # The dashboard's sign-in counts as well.
    refused = asyncio.run(_dashboard_login(gw.url, "thaw_guess_too"))
    assert refused["type"] == "error"
    limited = bad.get("/v1/functions")
    assert limited.status_code == 429, limited.text
    assert limited.json()["error"]["code"] == "too_many_failed_logins"
    assert 1 <= int(limited.headers["Retry-After"]) <= 600
    assert bad.post("/fn/dev/anything", json={}).status_code == 429  # every route
    late = asyncio.run(_dashboard_login(gw.url, "thaw_guess_three"))
    assert late["type"] == "error"
    assert late["error"]["code"] == "too_many_failed_logins"  # type: ignore[index]
    # The address's known key answers as before; a key this replica never saw waits.
    assert gw.http.get("/v1/functions").status_code == 200
    unseen = httpx.get(f"{gw.url}/v1/functions",
                       headers={"Authorization": f"Bearer {fresh.json()['key']}"})
    assert unseen.status_code == 429
    bad.close()
