"""Tenants, keys, public functions, quotas and the audit log against the real platform
(the dev key is the operator's: an admin key of the operator tenant "dev")."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from tests.conftest import RunningPlatform
from tests.gateway.conftest import Replica
from tests.gateway.tenancy_helpers import deploy, echo_bundle, new_tenant, unique
from thaw.ops.cli import cli


def test_only_the_operator_manages_tenants_and_nodes(platform: RunningPlatform) -> None:
    b = new_tenant(platform)
    listed = platform.http.get("/v1/tenants").json()["tenants"]
    assert b.tenant in [t["id"] for t in listed] and "dev" in [t["id"] for t in listed]
    for method, path, body in (("GET", "/v1/tenants", None),
                               ("POST", "/v1/tenants", {"id": unique("x")}),
                               ("PUT", f"/v1/tenants/{b.tenant}/quota", {"max_instances": 99}),
                               ("GET", "/v1/nodes", None), ("GET", "/v1/events", None)):
        resp = b.http.request(method, path, json=body)
        assert resp.status_code == 403, (method, path, resp.text)
        assert resp.json()["error"]["code"] == "permission_denied"
    assert platform.http.get("/v1/nodes").status_code == 200
    assert platform.http.post("/v1/tenants", json={"id": b.tenant}).status_code == 409
    bad = platform.http.post("/v1/tenants", json={"id": "Not A Name"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "id"


def test_a_key_is_shown_once_and_works_until_revoked(platform: RunningPlatform) -> None:
    b = new_tenant(platform)
    made = b.http.post("/v1/keys", json={"name": "ci", "scopes": ["invoke"]})
    assert made.status_code == 201, made.text
    created = made.json()
    assert created["key"].startswith("thaw_") and created["tenant"] == b.tenant
    assert made.headers["Cache-Control"] == "no-store"
    listed = b.http.get("/v1/keys").json()["keys"]
    assert {k["id"] for k in listed} == {b.key_id, created["id"]}
    text = b.http.get("/v1/keys").text
    assert created["key"] not in text and b.key not in text
    assert hashlib.sha256(created["key"].encode()).hexdigest() not in text
    # An invoke-only key cannot manage keys.
    ci = httpx.Client(base_url=platform.url,
                      headers={"Authorization": f"Bearer {created['key']}"})
    assert ci.get("/v1/keys").status_code == 403
    assert ci.get("/v1/functions").status_code == 200
    # A tenant admin may not name another tenant, nor set priorities.
    assert b.http.post("/v1/keys", json={"tenant": "dev"}).status_code == 403
    assert b.http.get("/v1/keys", params={"tenant": "dev"}).status_code == 403
    assert b.http.post("/v1/keys", json={"priority_max": 100}).status_code == 403
    bad = b.http.post("/v1/keys", json={"scopes": ["root"]})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "scopes"
    # Revoked through this gateway: refused at once (the auth cache forgets it).
    revoked = b.http.delete(f"/v1/keys/{created['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    refused = ci.get("/v1/functions")
    assert refused.status_code == 401
    # Another tenant's key id is "not found", not "forbidden".
    c = new_tenant(platform)
    assert c.http.delete(f"/v1/keys/{b.key_id}").status_code == 404
    assert b.http.get("/v1/functions").status_code == 200
    ci.close()


def test_an_expired_key_is_refused(platform: RunningPlatform) -> None:
    b = new_tenant(platform)
    made = b.http.post("/v1/keys", json={"scopes": ["invoke"], "expires_in": 1})
    assert made.status_code == 201 and made.json()["expires_at"] > time.time() - 1
    short = httpx.Client(base_url=platform.url,
                         headers={"Authorization": f"Bearer {made.json()['key']}"})
    while time.time() < made.json()["expires_at"] + 0.1:
        time.sleep(0.2)
    resp = short.get("/v1/functions")
    assert resp.status_code == 401 and "expired" in resp.json()["error"]["message"]
    short.close()


def test_public_functions_answer_without_a_key(platform: RunningPlatform,
                                               tmp_path: Path) -> None:
    b = new_tenant(platform)
    name = unique("pub")
    assert deploy(b.http, echo_bundle(tmp_path, name)).status_code == 201
    anonymous = httpx.Client(base_url=platform.url, timeout=120)
    url = f"/fn/{b.tenant}/{name}"
    assert anonymous.post(url, json={"x": 1}).status_code == 401  # private by default
    # Another tenant's key learns nothing: 404, as for a function that does not exist.
    other = platform.http.post(url, json={"x": 1})
    assert other.status_code == 404
    assert b.http.patch(f"/v1/functions/{name}", json={"public": "yes"}).status_code == 400
    assert platform.http.patch(f"/v1/functions/{name}", json={"public": True}
                               ).status_code == 404  # the dev tenant has no such function
    made = b.http.patch(f"/v1/functions/{name}", json={"public": True})
    assert made.status_code == 200 and made.json()["public"] is True
    answer = anonymous.post(url, json={"x": 1})
    assert answer.status_code == 200, answer.text
    assert answer.json()["echo"] == {"x": 1}
    # Public means invocable, not manageable.
    assert anonymous.get(f"/v1/functions/{name}").status_code == 401
    assert anonymous.delete(f"/v1/functions/{name}").status_code == 401
    # Other tenants' keys still do not reach it by key (their key names their tenant).
    assert platform.http.post(url, json={"x": 1}).status_code == 404
    assert b.http.patch(f"/v1/functions/{name}", json={"public": False}).status_code == 200
    assert anonymous.post(url, json={"x": 1}).status_code == 401
    anonymous.close()


def test_quota_refuses_new_instances_with_429(platform: RunningPlatform,
                                              tmp_path: Path) -> None:
    b = new_tenant(platform, max_instances=0)
    name = unique("q")
    assert deploy(b.http, echo_bundle(tmp_path, name, "256MiB")).status_code == 201
    refused = b.http.post(f"/fn/{b.tenant}/{name}", json={})
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert int(refused.headers["Retry-After"]) >= 1
    # Slice memory: 256MiB does not fit in 128MiB.
    quota = platform.http.put(f"/v1/tenants/{b.tenant}/quota",
                              json={"max_memory_bytes": "128MiB"})
    assert quota.status_code == 200 and quota.json()["max_memory_bytes"] == 128 * 2**20
    assert quota.json()["max_instances"] is None
    refused = b.http.post(f"/fn/{b.tenant}/{name}", json={})
    assert refused.status_code == 429 and "slice memory" in refused.json()["error"]["message"]
    # Room for exactly one: it starts, and while warm it keeps serving.
    platform.http.put(f"/v1/tenants/{b.tenant}/quota",
                      json={"max_memory_bytes": "256MiB", "max_instances": 1})
    for i in range(3):
        served = b.http.post(f"/fn/{b.tenant}/{name}", json={"i": i})
        assert served.status_code == 200, served.text
    bad = platform.http.put(f"/v1/tenants/{b.tenant}/quota", json={"max_instances": -1})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "max_instances"


def _audit(http: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    resp = http.get("/v1/audit", params={"limit": 1000, **params})
    assert resp.status_code == 200, resp.text
    entries: list[dict[str, Any]] = resp.json()["entries"]
    return entries


def test_management_actions_are_audited_with_the_key_id(platform: RunningPlatform,
                                                        tmp_path: Path) -> None:
    b = new_tenant(platform)
    since = time.time() - 1
    name = unique("aud")
    assert deploy(b.http, echo_bundle(tmp_path, name)).status_code == 201
    made = b.http.post("/v1/keys", json={"name": "temp", "scopes": ["invoke"]}).json()
    assert b.http.delete(f"/v1/keys/{made['id']}").status_code == 200
    assert b.http.delete(f"/v1/functions/{name}").status_code == 204
    invoker = httpx.Client(base_url=platform.url,
                           headers={"Authorization": f"Bearer {made['key']}"})
    assert invoker.delete(f"/v1/functions/{name}").status_code == 401  # revoked: denied
    invoker.close()
    entries = _audit(b.http, **{"from": since})
    actions = [(e["action"], e["target"], e["outcome"]) for e in entries]
    assert ("function.deploy", name, "ok") in actions
    assert ("key.create", made["id"], "ok") in actions
    assert ("key.revoke", made["id"], "ok") in actions
    assert ("function.delete", name, "ok") in actions
    for e in entries:
        assert e["tenant"] == b.tenant and e["source"]
        assert isinstance(e["time"], float) and e["time"] >= since
    # Its own actions name its key (the operator's, making the tenant, name the
    # operator's: see the next test). The scheduler's record of each key it made
    # (key.issue) names the component that asked instead.
    assert {e["key_id"] for e in entries if e["actor_tenant"] == b.tenant
            and e["action"] != "key.issue"} == {b.key_id}
    assert ("key.issue", made["id"], "ok") in actions
    text = b.http.get("/v1/audit").text
    assert b.key not in text and made["key"] not in text
    # The anonymous (revoked key) attempt is on record for the operator, as denied.
    everyone = _audit(platform.http, **{"from": since, "action": "function."})
    assert any(e["action"] == "function.delete" and e["outcome"] == "denied"
               and e["status"] == 401 and e["target"] == name and not e["key_id"]
               for e in everyone)
    # The operator filters by tenant; a tenant admin sees only its own.
    assert {e["tenant"] for e in _audit(platform.http, tenant=b.tenant)} == {b.tenant}
    assert b.http.get("/v1/audit", params={"tenant": "dev"}).status_code == 403
    assert all(e["tenant"] == b.tenant for e in _audit(b.http))
    assert _audit(b.http, action="key.create", **{"from": since})[0]["target"] == made["id"]
    assert b.http.get("/v1/audit", params={"limit": 0}).status_code == 400
    # The log has no route to change or remove an entry.
    assert b.http.delete("/v1/audit").status_code == 405


def test_the_operators_changes_to_a_tenant_are_in_that_tenants_audit_log(
        platform: RunningPlatform) -> None:
    b = new_tenant(platform)  # the operator made the tenant and its admin key
    assert platform.http.put(f"/v1/tenants/{b.tenant}/quota",
                             json={"max_instances": 7}).status_code == 200
    extra = platform.http.post("/v1/keys", json={"tenant": b.tenant, "scopes": ["invoke"]})
    assert extra.status_code == 201, extra.text
    assert platform.http.delete(f"/v1/keys/{extra.json()['id']}",
                                params={"tenant": b.tenant}).status_code == 200
    refused = platform.http.put(f"/v1/tenants/{b.tenant}/quota", json={"max_instances": -1})
    assert refused.status_code == 400
    assert b.http.post("/v1/keys", json={"name": "own", "scopes": ["invoke"]}
                       ).status_code == 201
    # Another tenant's admin trying its luck on B stays in its own log, not B's.
    c = new_tenant(platform)
    assert c.http.delete(f"/v1/keys/{b.key_id}", params={"tenant": b.tenant}
                         ).status_code == 403

    operator_keys = {k["id"] for k in platform.http.get("/v1/keys").json()["keys"]}
    seen = _audit(b.http)
    by_operator = [(e["action"], e["target"], e["outcome"]) for e in seen
                   if e["actor_tenant"] == "dev"]
    assert by_operator[::-1] == [
        ("tenant.create", b.tenant, "ok"), ("key.create", b.key_id, "ok"),
        ("tenant.quota", b.tenant, "ok"), ("key.create", extra.json()["id"], "ok"),
        ("key.revoke", extra.json()["id"], "ok"), ("tenant.quota", b.tenant, "failed")]
    for e in seen:
        assert e["tenant"] == b.tenant
        if e["action"] == "key.issue":  # the scheduler's own record of a key it made
            assert not e["key_id"] and e["detail"]["caller"] == "gateway"
        elif e["actor_tenant"] == "dev":
            # Who: the operator's key id (never the key), from the operator's tenant.
            assert e["key_id"] in operator_keys and e["key_id"] != b.key_id
        else:
            assert (e["actor_tenant"], e["key_id"]) == (b.tenant, b.key_id)
    assert [e["action"] for e in seen if e["actor_tenant"] == b.tenant
            and e["action"] != "key.issue"] == ["key.create"]
    assert c.key_id not in {e["key_id"] for e in seen}
    text = b.http.get("/v1/audit").text
    assert platform.key not in text and b.key not in text
    # C's attempt is in C's log, naming the tenant it aimed at.
    attempt = _audit(c.http, action="key.revoke")
    assert [(e["outcome"], e["detail"].get("on_tenant")) for e in attempt] == [
        ("denied", b.tenant)]
    # The operator sees them under B, and among its own tenant's (its keys acted).
    assert {e["id"] for e in seen} <= {e["id"] for e in _audit(platform.http,
                                                               tenant=b.tenant)}
    mine = {e["id"] for e in _audit(platform.http, tenant="dev")}
    assert {e["id"] for e in seen if e["actor_tenant"] == "dev"} <= mine
    # Still append-only: no route changes or removes an entry.
    for method in ("DELETE", "PUT", "PATCH", "POST"):
        assert b.http.request(method, "/v1/audit").status_code == 405


def test_the_cli_manages_tenants_keys_and_reads_the_audit_log(
        platform: RunningPlatform, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THAW_URL", platform.url)
    monkeypatch.setenv("THAW_API_KEY", platform.key)
    monkeypatch.delenv("THAW_PROFILE", raising=False)
    runner = CliRunner()
    name = unique("cli")
    made = runner.invoke(cli, ["tenant", "create", name])
    assert made.exit_code == 0, made.output
    quota = runner.invoke(cli, ["tenant", "quota", name, "--max-memory", "2GiB",
                                "--max-instances", "3"])
    assert quota.exit_code == 0 and "2.0 GiB" in quota.output, quota.output
    listed = runner.invoke(cli, ["tenant", "ls", "--json"])
    assert {"id": name, "max_instances": 3}.items() <= next(
        t for t in json.loads(listed.output) if t["id"] == name).items()
    created = runner.invoke(cli, ["key", "create", "--tenant", name, "--scope", "deploy",
                                  "--name", "from-cli", "--json"])
    assert created.exit_code == 0, created.output
    key = json.loads(created.output)
    assert key["scopes"] == ["deploy"] and key["key"].startswith("thaw_")
    keys = runner.invoke(cli, ["key", "ls", "--tenant", name, "--json"])
    assert [k["id"] for k in json.loads(keys.output)] == [key["id"]]
    assert key["key"] not in keys.output
    revoked = runner.invoke(cli, ["key", "revoke", key["id"], "--tenant", name])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    log = runner.invoke(cli, ["audit", "--since", "10m", "--action", "key.", "--json"])
    assert log.exit_code == 0, log.output
    entries = json.loads(log.output)
    assert {("key.create", key["id"]), ("key.revoke", key["id"])} <= {
        (e["action"], e["target"]) for e in entries}
    table = runner.invoke(cli, ["audit", "--limit", "5"])
    assert table.exit_code == 0 and "key.revoke" in table.output


def test_anonymous_calls_are_rate_limited_by_client_address(
        platform: RunningPlatform, tmp_path: Path,
        replica: Callable[[dict[str, str]], Replica]) -> None:
    b = new_tenant(platform)
    name = unique("anon")
    assert deploy(b.http, echo_bundle(tmp_path, name)).status_code == 201
    assert b.http.patch(f"/v1/functions/{name}", json={"public": True}).status_code == 200
    gw = replica({"THAW_RATE_LIMIT_RPM": "6", "THAW_RATE_LIMIT_BURST": "2"})
    anonymous = httpx.Client(base_url=gw.url, timeout=120)
    answers = [anonymous.post(f"/fn/{b.tenant}/{name}", json={}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429], [a.text for a in answers]
    assert answers[2].json()["error"]["code"] == "rate_limited"
    assert int(answers[2].headers["Retry-After"]) >= 1
    # The key holder has a bucket of its own: the address's is spent, not the key's.
    assert gw.http.get("/v1/functions").status_code == 200
    anonymous.close()
