"""Budgets of keys and tenants against the real platform (gateway/budgets.py,
scheduler/budgets.py): requests per day, tokens per minute from tinylm's usage, a
tenant's budget across its keys, and the CLI's flags."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from tests.conftest import EXAMPLES, RunningPlatform
from tests.gateway.conftest import deploy_once
from tests.gateway.tenancy_helpers import new_tenant, unique
from thaw.ops.cli import cli

CHAT = {"model": "tinylm", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Hi there!"}]}


@pytest.fixture(scope="module")
def tinylm(platform: RunningPlatform) -> str:
    return deploy_once(platform, EXAMPLES / "tinylm")


def key_client(platform: RunningPlatform, **body: Any) -> Iterator[httpx.Client]:
    made = platform.http.post("/v1/keys", json={"name": unique("budget"), **body})
    assert made.status_code == 201, made.text
    for field in ("rpm", "rpd", "tpm", "tpd"):
        assert made.json()["budgets"][field] == body.get(field)
    with httpx.Client(base_url=platform.url, timeout=120,
                      headers={"Authorization": f"Bearer {made.json()['key']}"}) as c:
        yield c


def refused(resp: httpx.Response, field: str, said: str) -> None:
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["code"] == "budget_exceeded" and error["field"] == field, error
    assert said in error["message"], error
    assert int(resp.headers["Retry-After"]) >= 1


def test_requests_per_day(platform: RunningPlatform, tinylm: str) -> None:
    for http in key_client(platform, rpd=2):
        for _ in range(2):
            ok = http.post("/v1/chat/completions", json=CHAT)
            assert ok.status_code == 200, ok.text
        third = http.post("/v1/chat/completions", json=CHAT)
        refused(third, "rpd", "2 requests per day")
        # The platform's own key has no budget and is not affected.
        assert platform.http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_tokens_per_minute_count_the_answers_usage(platform: RunningPlatform,
                                                   tinylm: str) -> None:
    first = platform.http.post("/v1/chat/completions", json=CHAT).json()["usage"]
    used = first["prompt_tokens"] + first["completion_tokens"]
    assert used > 1
    for http in key_client(platform, tpm=used + 1):
        # Within the budget: served and counted; then crossing it: served too.
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        refused(http.post("/v1/chat/completions", json=CHAT), "tpm",
                f"{used + 1} tokens per minute")
    # A stream counts too (its usage chunk, or one token per chunk without one).
    for http in key_client(platform, tpm=3):
        streamed = http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        refused(http.post("/v1/completions", json={
            "model": "tinylm", "prompt": "Once", "max_tokens": 2}), "tpm",
            "3 tokens per minute")


def test_a_tenants_budget_applies_across_its_keys(platform: RunningPlatform) -> None:
    b = new_tenant(platform)
    other = platform.http.post("/v1/keys", json={"tenant": b.tenant, "scopes": ["invoke"]})
    assert other.status_code == 201, other.text
    set_ = platform.http.put(f"/v1/tenants/{b.tenant}/budgets", json={"rpd": 3})
    assert set_.status_code == 200 and set_.json()["budgets"]["rpd"] == 3, set_.text
    # Only the operator sets a tenant's budgets.
    denied = b.http.put(f"/v1/tenants/{b.tenant}/budgets", json={"rpd": 300})
    assert denied.status_code == 403
    bad = platform.http.put(f"/v1/tenants/{b.tenant}/budgets", json={"rph": 3})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "rph"
    with httpx.Client(base_url=platform.url, timeout=120, headers={
            "Authorization": f"Bearer {other.json()['key']}"}) as c:
        assert b.http.get("/v1/models").status_code == 200
        assert c.get("/v1/models").status_code == 200
        assert b.http.get("/v1/models").status_code == 200
        refused(c.get("/v1/models"), "rpd", f"tenant {b.tenant}")
        refused(b.http.get("/v1/models"), "rpd", "3 requests per day")
    listed = platform.http.get("/v1/tenants").json()["tenants"]
    assert next(t for t in listed if t["id"] == b.tenant)["budgets"]["rpd"] == 3


def test_the_cli_sets_and_shows_budgets(platform: RunningPlatform,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THAW_URL", platform.url)
    monkeypatch.setenv("THAW_API_KEY", platform.key)
    monkeypatch.delenv("THAW_PROFILE", raising=False)
    runner = CliRunner()
    name = unique("cli")
    assert runner.invoke(cli, ["tenant", "create", name]).exit_code == 0
    made = runner.invoke(cli, ["key", "create", "--tenant", name, "--rpd", "5",
                               "--tpm", "100", "--json"])
    assert made.exit_code == 0, made.output
    key = json.loads(made.output)
    assert key["budgets"] == {"rpm": None, "rpd": 5, "tpm": 100, "tpd": None}
    table = runner.invoke(cli, ["key", "ls", "--tenant", name])
    assert table.exit_code == 0 and "rpd=5 tpm=100" in table.output, table.output
    budget = runner.invoke(cli, ["tenant", "budget", name, "--rpm", "60", "--tpd", "9000"])
    assert budget.exit_code == 0 and "rpm=60 tpd=9000" in budget.output, budget.output
    tenants = runner.invoke(cli, ["tenant", "ls"])
    assert "rpm=60 tpd=9000" in tenants.output, tenants.output
    cleared = runner.invoke(cli, ["tenant", "budget", name])
    assert cleared.exit_code == 0 and f"{name}: budgets -" in cleared.output
    bad = runner.invoke(cli, ["key", "create", "--tenant", name, "--rpd", "-1"])
    assert bad.exit_code != 0
