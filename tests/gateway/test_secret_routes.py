"""/v1/secrets against the real platform: who may, what each answer holds (never a
value), the status and field of each refusal, tenants kept apart, the audit entries,
and a start whose secret was deleted by force failing with the secret's name."""

from __future__ import annotations

import secrets
import textwrap
from pathlib import Path

import httpx

from tests.conftest import RunningPlatform
from tests.gateway.tenancy_helpers import deploy, new_tenant, unique


def test_set_list_delete_and_their_refusals(platform: RunningPlatform) -> None:
    b = new_tenant(platform, scopes=("deploy",))
    value = "val-" + secrets.token_hex(12)
    made = b.http.put("/v1/secrets/DB_PASSWORD", json={"value": value})
    assert made.status_code == 201, made.text
    doc = made.json()
    assert (doc["name"], doc["version"], doc["functions"], doc["drained"]) == (
        "DB_PASSWORD", 1, [], 0)
    assert doc["created_at"] == doc["updated_at"] and value not in made.text
    again = b.http.put("/v1/secrets/DB_PASSWORD", json={"value": value + "2"})
    assert again.status_code == 200 and again.json()["version"] == 2
    listed = b.http.get("/v1/secrets")
    assert listed.status_code == 200 and listed.headers["Cache-Control"] == "no-store"
    assert [s["name"] for s in listed.json()["secrets"]] == ["DB_PASSWORD"]
    assert set(listed.json()["secrets"][0]) == {"name", "created_at", "updated_at",
                                                "version"}
    assert value not in listed.text

    for body, field in (({"value": 5}, "value"), ({"value": "x", "other": 1}, "other"),
                        ([], "body"), ({}, "value"),
                        ({"value": "x" * (64 * 1024 + 1)}, "value"),
                        ({"value": "a\u0000b"}, "value")):
        bad = b.http.put("/v1/secrets/DB_PASSWORD", json=body)
        assert bad.status_code == 400, (body, bad.text)
        assert bad.json()["error"]["field"] == field, bad.text
    for name in ("THAW_TOKEN", "LD_PRELOAD", "PATH", "1ABC", "A-B"):
        bad = b.http.put(f"/v1/secrets/{name}", json={"value": "x"})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "name", name
    assert b.http.delete("/v1/secrets/NOPE").status_code == 404

    # Tenants apart: the operator's own list has none of b's; b may not name another.
    assert "DB_PASSWORD" not in [s["name"] for s in
                                 platform.http.get("/v1/secrets").json()["secrets"]]
    assert b.http.get("/v1/secrets", params={"tenant": "dev"}).status_code == 403
    # The operator may act on b's secrets by naming b.
    theirs = platform.http.get("/v1/secrets", params={"tenant": b.tenant})
    assert [s["name"] for s in theirs.json()["secrets"]] == ["DB_PASSWORD"]
    # An invoke-only key may not touch secrets.
    made_key = b.http.post("/v1/keys", json={"scopes": ["invoke"]})
    assert made_key.status_code == 403  # a deploy key makes no keys either
    invoker = new_tenant(platform, scopes=("invoke",))
    assert invoker.http.get("/v1/secrets").status_code == 403
    assert invoker.http.put("/v1/secrets/X", json={"value": "x"}).status_code == 403
    assert httpx.get(f"{platform.url}/v1/secrets").status_code == 401

    gone = b.http.delete("/v1/secrets/DB_PASSWORD")
    assert gone.status_code == 200 and gone.json() == {
        "name": "DB_PASSWORD", "deleted": True, "used_by": []}
    entries = platform.http.get("/v1/audit", params={"tenant": b.tenant}).json()["entries"]
    mine = [(e["action"], e["target"], e["outcome"]) for e in entries]
    assert ("secret.set", "DB_PASSWORD", "ok") in mine
    assert ("secret.delete", "DB_PASSWORD", "ok") in mine
    assert value not in str(entries)


def test_a_start_after_a_forced_delete_fails_naming_the_secret(
        platform: RunningPlatform, tmp_path: Path) -> None:
    b = new_tenant(platform)
    name = unique("needs")
    folder = tmp_path / name
    folder.mkdir()
    (folder / "app.py").write_text(textwrap.dedent('''\
        import os

        class Reads:
            def __call__(self, request):
                return {"has": "API_KEY" in os.environ}
        '''))
    (folder / "thaw.toml").write_text(textwrap.dedent(f'''\
        name = "{name}"
        handler = "app:Reads"
        secrets = ["API_KEY"]

        [snapshot]
        enabled = false
        '''))
    refused = deploy(b.http, folder)
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "secrets"
    assert "API_KEY" in refused.json()["error"]["message"]
    assert b.http.put("/v1/secrets/API_KEY", json={"value": "k"}).status_code == 201
    assert deploy(b.http, folder).status_code == 201  # fresh starts: nothing started yet

    in_use = b.http.delete("/v1/secrets/API_KEY")
    assert in_use.status_code == 409
    assert in_use.json()["error"]["code"] == "secret_in_use"
    assert name in in_use.json()["error"]["message"]
    forced = b.http.delete("/v1/secrets/API_KEY", params={"force": "true"})
    assert forced.status_code == 200 and forced.json()["used_by"] == [name]
    failed = b.http.post(f"/fn/{b.tenant}/{name}", json={})
    assert failed.status_code == 400, failed.text
    assert failed.json()["error"]["field"] == "secrets"
    assert "API_KEY" in failed.json()["error"]["message"]
    # Set again: the next start has it.
    assert b.http.put("/v1/secrets/API_KEY", json={"value": "k2"}).status_code == 201
    call = b.http.post(f"/fn/{b.tenant}/{name}", json={})
    assert call.status_code == 200 and call.json() == {"has": True}
