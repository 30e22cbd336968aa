"""The authorization matrix: tenant B's admin key against every route of the gateway
that can concern tenant A (the dev tenant). Each route that names one of A's things
answers 403 or 404; no answer of any route, to B, carries a byte of A's data (its
function's name, its invocations' ids, their results, its keys' ids).

The routes come from the served OpenAPI document, so routes added later are covered
without touching this test; a path parameter this test has no value for gets A's
function name (and the test says which names it met, so a new kind is noticed).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import RunningPlatform
from tests.gateway.tenancy_helpers import deploy, echo_bundle, new_tenant

# Statuses a route that names one of A's things may give B. (404 rather than 403 where
# the thing's existence itself is A's business.)
REFUSED = {403, 404}
# For a body-taking route, B's request may be malformed for it before ownership is
# checked: refused without a look at A's data either way.
REFUSED_WITH_BODY = REFUSED | {400, 405, 409, 413, 415, 422}
# Answers may be long (logs, usage, events): read this much of each for the check.
BODY_LIMIT = 2_000_000
# Lookups that answer for the caller's own tenant whatever they name: B is told what B
# has (here: no such archive), never what A has.
OWN_VIEW = {("get", "/v1/images/{image_id}"): '"stored": false'}
LIVE_MESSAGES = 3
LIVE_SECONDS = 15.0
PARAM = re.compile(r"\{(\w+)\}")


def _values(a: dict[str, str], param: str, path: str) -> list[str]:
    """Values of A's things for one path parameter."""
    if path.startswith("/v1/secrets/"):
        return [a["secret"]]
    if param in ("name", "model", "function"):
        return [a["function"]]
    if param == "tenant":
        return ["dev"]
    if param == "id":
        if path.startswith("/v1/keys"):
            return [a["key_id"]]
        if path.startswith("/v1/invocations"):
            return [a["async_id"], a["sync_id"]]
        return [a["key_id"], a["async_id"], a["function"]]
    if param in ("invocation", "invocation_id"):
        return [a["async_id"], a["sync_id"]]
    if param == "node":
        return [a["node"]]
    if param == "action":
        return ["cordon", "uncordon"]
    if param == "version":
        return ["1"]
    if param == "path":
        return ["x"]
    if param == "image_id":
        return [a["image_id"]]
    if param == "trace_id":
        return [a["trace_id"]]
    return [a["function"]]


def _leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


def _expand(path: str, a: dict[str, str]) -> list[str]:
    urls = [path]
    for param in PARAM.findall(path):
        urls = [u.replace("{" + param + "}", v) for u in urls
                for v in _values(a, param, path)]
    return urls


async def _live(url: str, key: str) -> list[str]:
    """The first messages of the dashboard's live feed, for `key`."""
    got: list[str] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(
            url.replace("http", "ws", 1) + "/v1/live") as ws:
        await ws.send_json({"key": key})
        while len(got) < LIVE_MESSAGES:
            msg = await ws.receive(timeout=LIVE_SECONDS)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            got.append(msg.data)
    return got


def _a_side(platform: RunningPlatform, tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    """Tenant A's things: a function, a sync and an async invocation, a key."""
    marker = f"result-of-a-{uuid.uuid4().hex}"
    name = f"mx-{uuid.uuid4().hex[:10]}"
    assert deploy(platform.http, echo_bundle(tmp_path, name)).status_code == 201
    sync = platform.http.post(f"/fn/dev/{name}", json={"secret": marker})
    assert sync.status_code == 200 and marker in sync.text, sync.text
    queued = platform.http.post(f"/fn/dev/{name}", json={"secret": marker},
                                headers={"Prefer": "respond-async"})
    assert queued.status_code == 202, queued.text
    async_id = queued.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # let it finish: its result is A's data too
        state = platform.http.get(f"/v1/invocations/{async_id}").json()
        if state["status"] in ("succeeded", "failed", "cancelled", "expired"):
            break
        time.sleep(0.2)
    key = platform.http.post("/v1/keys", json={"name": f"a-{name}", "scopes": ["invoke"]})
    assert key.status_code == 201
    secret = f"MX_{uuid.uuid4().hex[:10].upper()}"
    stored = platform.http.put(f"/v1/secrets/{secret}", json={"value": marker})
    assert stored.status_code == 201, stored.text
    nodes = platform.http.get("/v1/nodes").json()["nodes"]
    a = {"function": name, "sync_id": sync.headers["X-Request-ID"], "async_id": async_id,
         "key_id": key.json()["id"], "node": nodes[0]["id"], "marker": marker,
         "secret": secret,
         # An image id A could have uploaded: B is refused whether or not it exists.
         "image_id": "sha256:" + uuid.uuid4().hex * 2,
         # The trace of A's sync call (its answer's traceparent: version-trace-span-flags).
         "trace_id": sync.headers["traceparent"].split("-")[1]}
    secrets = [name, a["sync_id"], async_id, a["key_id"], marker, platform.key,
               key.json()["key"]]
    return a, secrets


def test_tenant_b_reaches_nothing_of_tenant_a(platform: RunningPlatform,
                                              tmp_path: Path) -> None:
    a, secrets = _a_side(platform, tmp_path)
    b = new_tenant(platform)  # an admin key: the strongest a tenant can hold
    document = platform.http.get("/openapi.json").json()
    checked, failures, params_met = 0, [], set()
    # Positive control: the operator (A) does see these, so the checks can fail.
    assert a["function"] in platform.http.get(f"/v1/functions/{a['function']}").text
    assert a["marker"] in platform.http.get(f"/v1/invocations/{a['async_id']}/result").text
    # Routes naming nothing first, so what they list (B's audit log too) is from
    # before B named any of A's things in a request.
    ordered = sorted(document["paths"].items(), key=lambda kv: PARAM.search(kv[0]) is not None)
    for path, item in ordered:
        for method, operation in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            if operation.get("security") == [] and not path.startswith("/fn/"):
                continue  # public: health, metrics, the page, static files
            if path == "/v1/live":
                continue  # a WebSocket: checked below
            params_met.update(PARAM.findall(path))
            has_body = "requestBody" in operation
            named = PARAM.search(path) is not None
            for url in _expand(path, a):
                for query in ({}, {"tenant": "dev"}):
                    body: Any = {"public": True, "model": a["function"], "tenant": "dev",
                                 "messages": [], "prompt": "", "input": ""}
                    sent = body if has_body or method != "get" else None
                    resp = b.http.request(method.upper(), url, params=query, json=sent)
                    checked += 1
                    text = resp.text[:BODY_LIMIT]
                    where = f"{method.upper()} {url} {query or ''} -> {resp.status_code}"
                    # An identifier B itself sent may come back in a refusal ("function
                    # x not found"); anything else of A's may not, ever.
                    asked = url + json.dumps(sent)
                    leaked = _leaks(text + json.dumps(dict(resp.headers)),
                                    [x for x in secrets if x not in asked])
                    if leaked:
                        failures.append(f"{where}: leaks {leaked}: {text[:300]}")
                    if resp.status_code >= 500:
                        failures.append(f"{where}: server error {text[:300]}")
                    allowed = REFUSED_WITH_BODY if has_body else REFUSED
                    own = OWN_VIEW.get((method, path))
                    if own and resp.status_code == 200 and own in text:
                        continue
                    if named and resp.status_code not in allowed:
                        failures.append(f"{where}: expected {sorted(allowed)}: {text[:300]}")
    # The dashboard's live data, for B: its own tenant's only.
    messages = asyncio.run(_live(platform.url, b.key))
    assert messages and json.loads(messages[0]).get("operator") is False, messages
    for message in messages:
        if _leaks(message, secrets):
            failures.append(f"/v1/live leaks {_leaks(message, secrets)}: {message[:300]}")
    # Positive control for the feed: the operator's does show A's function.
    operator_feed = asyncio.run(_live(platform.url, platform.key))
    assert any(a["function"] in m for m in operator_feed), operator_feed[:2]
    # Nothing changed for A: its function still answers, its invocation is intact.
    assert platform.http.get(f"/v1/functions/{a['function']}").status_code == 200
    assert platform.http.post(f"/fn/dev/{a['function']}", json={}).status_code == 200
    listed = platform.http.get("/v1/secrets").json()
    assert a["secret"] in json.dumps(listed), listed  # B's DELETE did not remove it
    platform.http.delete(f"/v1/secrets/{a['secret']}")
    assert checked > 40, checked
    assert not failures, f"{len(failures)} of {checked} requests:\n" + "\n".join(failures)
    print(f"authorization matrix: {checked} requests; path parameters met: "
          f"{sorted(params_met)}")
