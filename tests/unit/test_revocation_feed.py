"""The gateway's auth cache follows the revocation feed (gateway/auth.py), with a fake
scheduler and a fake sleep: revoked keys leave the cache on the next poll, the cursor
is passed on, and an outage of the feed neither stops nor floods it."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from thaw.core.errors import Unavailable
from thaw.gateway.auth import REVOCATION_POLL_SECONDS, Authenticator
from thaw.proto import scheduler_pb2


class FakeScheduler:
    def __init__(self) -> None:
        self.keys = {"k-a": "key_a", "k-b": "key_b"}
        self.lookups = 0

    async def authenticate(self, digest: str) -> scheduler_pb2.Principal:
        self.lookups += 1
        for key, key_id in self.keys.items():
            if hashlib.sha256(key.encode()).hexdigest() == digest:
                return scheduler_pb2.Principal(tenant="t", key_id=key_id, scopes=["invoke"])
        raise AssertionError("unknown key")


async def test_revoked_keys_leave_the_cache_on_the_next_poll() -> None:
    scheduler = FakeScheduler()
    auth = Authenticator(scheduler)  # type: ignore[arg-type]
    for key in ("k-a", "k-b"):
        await auth.principal(f"Bearer {key}")
    assert scheduler.lookups == 2
    answers: list[tuple[list[str], float] | Exception] = [
        ([], 100.0), Unavailable("scheduler away"), Unavailable("still away"),
        (["key_a"], 103.0), (["key_a"], 104.0)]
    asked: list[float] = []
    slept: list[float] = []

    async def revoked_since(cursor: float) -> tuple[list[str], float]:
        asked.append(cursor)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if not answers:
            raise asyncio.CancelledError
        await asyncio.sleep(0)

    with pytest.raises(asyncio.CancelledError):
        await auth.follow_revocations(revoked_since, sleep)
    # The cursor of the last good answer is kept through the outage.
    assert asked == [0.0, 100.0, 100.0, 100.0, 103.0]
    assert slept == [REVOCATION_POLL_SECONDS] * 5
    # key_a was dropped: its next call asks the scheduler again; key_b stays cached.
    await auth.principal("Bearer k-b")
    assert scheduler.lookups == 2
    await auth.principal("Bearer k-a")
    assert scheduler.lookups == 3
