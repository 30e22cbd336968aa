"""A key revoked through one gateway is refused by another replica (a second `thaw
gateway` process on the same scheduler) within about a second: each replica follows
the scheduler's revocation feed instead of waiting out its auth cache's TTL."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.conftest import RunningPlatform
from tests.gateway.conftest import Replica
from tests.gateway.tenancy_helpers import new_tenant
from thaw.gateway.auth import AUTH_CACHE_SECONDS, REVOCATION_POLL_SECONDS

# Two polls and some slack: well under the auth cache's TTL, which alone (the replica
# cached the key just before it was revoked) would keep it working for 10 s.
REFUSED_WITHIN_SECONDS = 2 * REVOCATION_POLL_SECONDS + 1.0
assert REFUSED_WITHIN_SECONDS < AUTH_CACHE_SECONDS / 2


def test_a_key_revoked_through_one_gateway_is_refused_by_another(
        platform: RunningPlatform, replica: Callable[[dict[str, str]], Replica]) -> None:
    b = new_tenant(platform)
    other = replica({})
    made = b.http.post("/v1/keys", json={"name": "leaked", "scopes": ["invoke"]})
    assert made.status_code == 201, made.text
    leaked = httpx.Client(base_url=other.url, timeout=30,
                          headers={"Authorization": f"Bearer {made.json()['key']}"})
    untouched = httpx.Client(base_url=other.url, timeout=30,
                             headers={"Authorization": f"Bearer {b.key}"})
    try:
        # The replica has the key in its auth cache now.
        assert leaked.get("/v1/functions").status_code == 200
        assert untouched.get("/v1/functions").status_code == 200
        revoked = b.http.delete(f"/v1/keys/{made.json()['id']}")  # through the other gateway
        assert revoked.status_code == 200, revoked.text
        deadline = time.monotonic() + REFUSED_WITHIN_SECONDS
        while (resp := leaked.get("/v1/functions")).status_code == 200:
            assert time.monotonic() < deadline, "the replica still accepts a revoked key"
            time.sleep(0.05)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "unauthenticated"
        # Only that key: the tenant's other key still works on the replica.
        assert untouched.get("/v1/functions").status_code == 200
    finally:
        leaked.close()
        untouched.close()
