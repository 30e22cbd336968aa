"""Audit action names come from the routes, those of every feature module included."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from thaw.core.config import GatewayConfig
from thaw.gateway.app import make_app
from thaw.gateway.audit import action_of, audited, outcome_of


@pytest.mark.parametrize(("method", "path", "action"), [
    ("POST", "/v1/functions", "function.deploy"),
    ("DELETE", "/v1/functions/embed", "function.delete"),
    ("PATCH", "/v1/functions/embed", "function.update"),
    ("POST", "/v1/functions/embed/prewarm", "snapshot.prewarm"),
    ("POST", "/v1/functions/embed/evict", "snapshot.evict"),
    ("POST", "/v1/functions/embed/rollback", "function.rollback"),
    ("POST", "/v1/nodes/n1/cordon", "node.cordon"),
    ("POST", "/v1/nodes/n1/uncordon", "node.uncordon"),
    ("POST", "/v1/nodes/n1/drain", "node.drain"),
    ("POST", "/v1/keys", "key.create"),
    ("DELETE", "/v1/keys/key_1", "key.revoke"),
    ("POST", "/v1/tenants", "tenant.create"),
    ("PUT", "/v1/tenants/acme/quota", "tenant.quota"),
    ("POST", "/v1/invocations/inv_1/cancel", "invocation.cancel"),
    ("POST", "/v1/volumes", "volume.create"),
    ("POST", "/v1/volumes/weights/commit", "volume.commit"),
    ("DELETE", "/v1/volumes/weights", "volume.delete"),
    ("POST", "/v1/functions/chunked", "function.deploy"),
    ("PUT", "/v1/tenants/acme/storage-quota", "tenant.storage-quota"),
])
async def test_actions_are_named_from_the_route(method: str, path: str, action: str) -> None:
    app = make_app(GatewayConfig())
    request = make_mocked_request(method, path, app=app)
    match = await app.router.resolve(request)
    assert match.http_exception is None, f"{method} {path} is not served"
    request._match_info = match  # what aiohttp does before the handler runs
    match.add_app(app)
    assert audited(method, path)
    assert action_of(request) == action


def test_reads_and_invocation_traffic_are_not_audited() -> None:
    assert not audited("GET", "/v1/functions")
    assert not audited("POST", "/fn/dev/echo")
    assert not audited("POST", "/v1/chat/completions")
    assert not audited("POST", "/v1/embeddings")
    assert audited("DELETE", "/v1/functions/x")
    # Chunks are the transfer under an audited commit or chunked deploy.
    assert not audited("PUT", "/v1/blobs/" + "0" * 64)
    assert not audited("POST", "/v1/blobs/missing")


def test_outcomes() -> None:
    assert [outcome_of(s) for s in (200, 201, 204, 401, 403, 404, 429, 500)] == [
        "ok", "ok", "ok", "denied", "denied", "failed", "failed", "failed"]
