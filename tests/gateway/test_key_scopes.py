"""Keys do what their scope says: an invoke-only key reads only the stored invocations
it made itself (another key's is "not found", worded as for an id that never was), and
no logs; deploy and admin keys of the tenant read all of the tenant's; /metrics is the
operator's; the dashboard origin answers with CSP and friends, and function URLs live
on an origin of their own."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import RunningPlatform
from tests.gateway.conftest import Replica
from tests.gateway.tenancy_helpers import TenantKeys, deploy, echo_bundle, new_tenant, unique

FINISHED = ("succeeded", "failed", "cancelled", "expired")


def _key(platform: RunningPlatform, tenant: TenantKeys, scopes: list[str]) -> httpx.Client:
    made = tenant.http.post("/v1/keys", json={"name": unique("k"), "scopes": scopes})
    assert made.status_code == 201, made.text
    return httpx.Client(base_url=platform.url, timeout=120,
                        headers={"Authorization": f"Bearer {made.json()['key']}"})


def _finished(http: httpx.Client, invocation_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 120
    while True:
        body: dict[str, object] = http.get(f"/v1/invocations/{invocation_id}").json()
        if body.get("status") in FINISHED or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


@pytest.fixture(scope="module")
def scoped(platform: RunningPlatform, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, object]:
    """A tenant with an echo function, two invoke-only keys, a deploy key, an admin key;
    one async invocation by each invoke-only key."""
    tenant = new_tenant(platform)
    name = unique("scoped")
    assert deploy(tenant.http, echo_bundle(tmp_path_factory.mktemp("scoped"), name)
                  ).status_code == 201
    first, second = _key(platform, tenant, ["invoke"]), _key(platform, tenant, ["invoke"])
    ids = []
    for http, marker in ((first, "made-by-first"), (second, "made-by-second")):
        resp = http.post(f"/fn/{tenant.tenant}/{name}", json={"marker": marker},
                         headers={"Prefer": "respond-async"})
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    assert _finished(first, ids[0])["status"] == "succeeded"
    assert _finished(second, ids[1])["status"] == "succeeded"
    return {"tenant": tenant, "name": name, "first": first, "second": second,
            "deployer": _key(platform, tenant, ["deploy"]), "ids": ids}


def test_an_invoke_only_key_reads_only_its_own_invocations(scoped: dict[str, object]
                                                           ) -> None:
    first, second = scoped["first"], scoped["second"]
    assert isinstance(first, httpx.Client) and isinstance(second, httpx.Client)
    mine, theirs = scoped["ids"]  # type: ignore[misc]
    assert first.get(f"/v1/invocations/{mine}").json()["result"]["echo"] == {
        "marker": "made-by-first"}
    assert "made-by-first" in first.get(f"/v1/invocations/{mine}/result").text
    # Another key's invocation: exactly the answer an id that never existed gets.
    never = "inv_" + "0" * 32
    for url in (f"/v1/invocations/{theirs}", f"/v1/invocations/{theirs}/result"):
        resp = first.get(url)
        assert resp.status_code == 404, resp.text
        assert "made-by-second" not in resp.text
        assert resp.json()["error"]["code"] == "not_found"
        unknown = first.get(url.replace(theirs, never))
        assert resp.json()["error"]["message"].replace(theirs, "ID") == \
            unknown.json()["error"]["message"].replace(never, "ID")
    assert first.post(f"/v1/invocations/{theirs}/cancel").status_code == 404
    listed = [i["id"] for i in first.get("/v1/invocations").json()["invocations"]]
    assert listed == [mine]
    assert [i["id"] for i in second.get("/v1/invocations").json()["invocations"]] == [theirs]


def test_deploy_and_admin_keys_read_all_of_the_tenants_invocations(
        scoped: dict[str, object]) -> None:
    tenant, deployer = scoped["tenant"], scoped["deployer"]
    assert isinstance(tenant, TenantKeys) and isinstance(deployer, httpx.Client)
    ids = set(scoped["ids"])  # type: ignore[call-overload]
    for http in (deployer, tenant.http):
        listed = {i["id"] for i in http.get("/v1/invocations").json()["invocations"]}
        assert ids <= listed
        for invocation_id in ids:
            assert http.get(f"/v1/invocations/{invocation_id}").status_code == 200
            assert http.get(f"/v1/invocations/{invocation_id}/result").status_code == 200


def test_an_idempotency_key_of_another_api_key_reveals_nothing(
        scoped: dict[str, object]) -> None:
    first, second = scoped["first"], scoped["second"]
    assert isinstance(first, httpx.Client) and isinstance(second, httpx.Client)
    tenant = scoped["tenant"]
    assert isinstance(tenant, TenantKeys)
    url = f"/fn/{tenant.tenant}/{scoped['name']}"
    idem = {"Idempotency-Key": unique("idem")}
    made = first.post(url, json={"marker": "idem-first"}, headers=idem)
    assert made.status_code == 200 and "idem-first" in made.text
    invocation_id = made.headers["X-Thaw-Invocation"]
    # The same key again gets its first answer; another key gets neither it nor its id.
    assert "idem-first" in first.post(url, json={"marker": "idem-first"},
                                      headers=idem).text
    other = second.post(url, json={"marker": "idem-first"}, headers=idem)
    assert other.status_code == 422, other.text
    assert "idem-first" not in other.text
    assert other.json()["error"]["field"] == "Idempotency-Key"
    assert invocation_id not in other.text


def test_logs_need_the_deploy_or_admin_scope(scoped: dict[str, object]) -> None:
    first, deployer, tenant = scoped["first"], scoped["deployer"], scoped["tenant"]
    assert isinstance(first, httpx.Client) and isinstance(deployer, httpx.Client)
    assert isinstance(tenant, TenantKeys)
    path = f"/v1/functions/{scoped['name']}/logs"
    refused = first.get(path)
    assert refused.status_code == 403, refused.text
    assert "'deploy' or 'admin'" in refused.json()["error"]["message"]
    assert deployer.get(path).status_code == 200
    assert tenant.http.get(path).status_code == 200
    # Deploy-time records likewise; finding and calling functions stays the invoke key's.
    for read in ("/v1/snapshots", f"/v1/snapshots/{scoped['name']}",
                 f"/v1/functions/{scoped['name']}/versions"):
        assert first.get(read).status_code == 403, read
        assert deployer.get(read).status_code == 200, read
    assert first.get(f"/v1/functions/{scoped['name']}").status_code == 200
    assert first.get("/v1/models").status_code == 200


def test_metrics_are_the_operators(platform: RunningPlatform) -> None:
    anonymous = httpx.get(f"{platform.url}/metrics", timeout=30)
    assert anonymous.status_code == 401
    assert "thaw_invocations_total" not in anonymous.text
    tenant = new_tenant(platform)  # an admin key, of a tenant that is not the operator
    refused = tenant.http.get("/metrics")
    assert refused.status_code == 403 and "thaw_invocations_total" not in refused.text
    served = platform.http.get("/metrics")
    assert served.status_code == 200 and "thaw_invocations_total" in served.text


def test_the_dashboard_origin_sends_its_security_headers(platform: RunningPlatform) -> None:
    page = httpx.get(f"{platform.url}/", timeout=30)
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    script = httpx.get(f"{platform.url}/static/dashboard.js", timeout=30)
    assert script.headers["X-Content-Type-Options"] == "nosniff"
    # API JSON, errors included: nosniff, and a sandbox should a browser render it.
    for resp in (platform.http.get("/v1/functions"), httpx.get(f"{platform.url}/v1/keys")):
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Content-Security-Policy"].startswith("sandbox")


def test_function_urls_live_on_their_own_origin(platform: RunningPlatform,
                                                tmp_path: Path) -> None:
    name = unique("origin")
    assert deploy(platform.http, echo_bundle(tmp_path, name)).status_code == 201
    url = platform.http.get(f"/v1/functions/{name}").json()["url"]
    dashboard, function = urlsplit(platform.url), urlsplit(url)
    assert function.path == f"/fn/dev/{name}"
    assert (function.scheme, function.hostname) == (dashboard.scheme, dashboard.hostname)
    assert function.port != dashboard.port  # another origin
    origin = f"{function.scheme}://{function.netloc}"
    auth = {"Authorization": f"Bearer {platform.key}"}
    # On the function origin: the function's answer as it gave it, fast lane or not.
    for extra in ({}, {"Prefer": "wait=30"}):
        answer = httpx.post(url, json={"on": "function origin"}, headers={**auth, **extra},
                            timeout=120)
        assert answer.status_code == 200 and answer.json()["echo"] == {
            "on": "function origin"}
        assert "Content-Security-Policy" not in answer.headers
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
    # Nothing of the dashboard or the management API is served there.
    for path in ("/", "/static/dashboard.js", "/v1/keys", "/v1/functions", "/metrics"):
        resp = httpx.get(origin + path, headers=auth, timeout=30)
        assert resp.status_code == 404, (path, resp.text)
        assert "function origin" in resp.json()["error"]["message"]
    # On the dashboard origin a function's answer still comes, sandboxed: no script of
    # the tenant's ever runs as the dashboard's origin.
    for extra in ({}, {"Prefer": "wait=30"}):
        answer = platform.http.post(f"/fn/dev/{name}", json={}, headers=extra)
        assert answer.status_code == 200
        assert answer.headers["Content-Security-Policy"].startswith("sandbox")
        assert answer.headers["X-Frame-Options"] == "DENY"
    platform.http.delete(f"/v1/functions/{name}")


def test_without_the_fast_lane_the_origins_hold_the_same(
        platform: RunningPlatform, replica: Callable[[dict[str, str]], Replica],
        tmp_path: Path) -> None:
    gw = replica({"THAW_FAST_LANE": "false"})
    name = unique("plain")
    assert deploy(platform.http, echo_bundle(tmp_path, name)).status_code == 201
    url = gw.http.get(f"/v1/functions/{name}").json()["url"]
    assert urlsplit(url).port not in (urlsplit(gw.url).port, None)
    origin = f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
    answer = httpx.post(url, json={"plain": True}, timeout=120,
                        headers={"Authorization": f"Bearer {platform.key}"})
    assert answer.status_code == 200 and answer.json()["echo"] == {"plain": True}
    assert "Content-Security-Policy" not in answer.headers
    assert httpx.get(origin + "/", timeout=30).status_code == 404
    sandboxed = gw.http.post(f"/fn/dev/{name}", json={})
    assert sandboxed.headers["Content-Security-Policy"].startswith("sandbox")
    assert "script-src 'self'" in httpx.get(gw.url + "/", timeout=30).headers[
        "Content-Security-Policy"]
    platform.http.delete(f"/v1/functions/{name}")
