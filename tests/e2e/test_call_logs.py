"""Per-call logs through the whole path on one LocalPlatform: two concurrent calls in
one instance print interleaved lines and each call's `?request=` answers exactly its
own (sync, SSE-streamed and stored `Prefer: respond-async` calls, and `thaw fn logs
--request`); another tenant gets 404; a call's cap and truncation line; the retention
(a 1 MiB byte total per function, set in the agent's environment) drops the oldest
calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import FIXTURES, RunningPlatform, running
from thaw.ops.services import LocalPlatform
from thaw.platform.calllogs import MAX_BYTES_ENV, MAX_CALL_BYTES, MAX_CALL_LINES, TRUNCATED_TEXT

NAME = "call-logs"
# The agent reads instances' output every 0.2 s: a call's lines are asked for until
# they are all there, at most this many times (a bound for a loaded machine).
POLLS = 300


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    home = tmp_path_factory.mktemp("call-logs-home")
    before = os.environ.get(MAX_BYTES_ENV)
    os.environ[MAX_BYTES_ENV] = str(MAX_CALL_BYTES)  # the agent inherits it
    try:
        with running(LocalPlatform(home, gateway_port=0, host_devices="1x4GiB")) as started:
            assert started.deploy(FIXTURES / "call_logs").status_code == 201
            yield started
    finally:
        if before is None:
            os.environ.pop(MAX_BYTES_ENV, None)
        else:
            os.environ[MAX_BYTES_ENV] = before


def call_lines(platform: RunningPlatform, request_id: str, count: int,
               path: str = f"/v1/functions/{NAME}/logs") -> list[dict[str, Any]]:
    """The call's lines once `count` of them are kept."""
    params = {} if path.startswith("/v1/invocations") else {"request": request_id}
    lines: list[dict[str, Any]] = []
    for _ in range(POLLS):
        reply = platform.http.get(path, params=params)
        assert reply.status_code == 200, reply.text
        lines = [json.loads(ln) for ln in reply.text.splitlines() if ln]
        if len(lines) >= count:
            break
        time.sleep(0.1)
    return lines


def texts(lines: list[dict[str, Any]]) -> list[str]:
    return [ln["line"] for ln in lines]


# Every tag the fixture prints lines with in this module.
TAGS = ("alpha", "beta", "sse", "stored", "flood", "wide-1", "wide-2")


def printed(lines: list[dict[str, Any]], tag: str) -> list[str]:
    """The fixture's lines among a call's (the runtime may add its own records, such as
    a library's warning printed during the call); none may be another call's."""
    found = [t for t in texts(lines) if t.split(" ", 1)[0] in TAGS]
    assert all(t.split(" ", 1)[0] == tag for t in found), found
    return found


def test_concurrent_calls_each_see_only_their_own_lines(platform: RunningPlatform) -> None:
    n = 40
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda tag: platform.invoke(
            NAME, {"tag": tag, "lines": n, "meet": True}), ("alpha", "beta")))
    ids = {}
    for tag, answer in zip(("alpha", "beta"), answers, strict=True):
        assert answer.status_code == 200 and answer.json() == {"tag": tag}, answer.text
        ids[tag] = answer.headers["X-Request-ID"]
    assert ids["alpha"] != ids["beta"]
    for tag, request_id in ids.items():
        lines = call_lines(platform, request_id, n + 1)
        assert printed(lines, tag) == [f"{tag} line {i}" for i in range(n)] + [
            f"{tag} to stderr"]
        assert {ln["request"] for ln in lines} == {request_id}
        assert {ln["stream"] for ln in lines} == {"output"}
    # The function's whole log holds both calls' lines, interleaved (one instance, the
    # calls met before printing), each marked with its call, and setup's unmarked.
    whole = [json.loads(ln) for ln in platform.http.get(
        f"/v1/functions/{NAME}/logs", params={"tail": "1000"}).text.splitlines() if ln]
    order = [ln["request"] for ln in whole if ln["request"] in ids.values()]
    assert len([ln for ln in whole if ln["request"] in ids.values()
                and ln["line"].split(" ", 1)[0] in TAGS]) == 2 * (n + 1)
    switches = sum(1 for a, b in zip(order, order[1:], strict=False) if a != b)
    assert switches > 1, "the two calls' lines did not interleave"
    # setup() printed outside any call (a restored instance did not run it here).
    assert all(ln["request"] == "" for ln in whole if ln["line"] == "call-logs: setup")
    assert not any("thaw-call" in ln["line"] for ln in whole)


def test_a_streamed_calls_lines_and_the_client_request_id(platform: RunningPlatform) -> None:
    chosen = "client-chosen-id.1"
    with platform.http.stream("POST", f"/fn/dev/{NAME}", json={"tag": "sse", "lines": 5,
                                                               "stream": True},
                              headers={"Accept": "text/event-stream",
                                       "X-Request-ID": chosen}) as answer:
        assert answer.status_code == 200
        assert answer.headers["X-Request-ID"] == chosen
        events = [ln for ln in answer.iter_lines() if ln.startswith("data: {\"i\"")]
    assert len(events) == 5
    lines = call_lines(platform, chosen, 5)
    assert printed(lines, "sse") == [f"sse item {i}" for i in range(5)]

    env = {k: v for k, v in os.environ.items() if not k.startswith("THAW_")}
    env.update({"THAW_URL": platform.url, "THAW_API_KEY": platform.key,
                "HOME": str(platform.platform.home),
                "THAW_CONFIG_FILE": str(platform.platform.home / "absent.toml")})
    cli = subprocess.run([sys.executable, "-m", "thaw.ops", "fn", "logs", NAME,
                          "--request", chosen], env=env, capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0, cli.stderr
    shown = [line.split(" ", 2)[2].lstrip() for line in cli.stdout.splitlines()]
    assert shown == texts(lines)
    both = subprocess.run([sys.executable, "-m", "thaw.ops", "fn", "logs", NAME,
                           "--request", chosen, "-f"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert both.returncode != 0 and "--request" in both.stderr


def test_a_stored_invocations_lines_and_another_tenant(platform: RunningPlatform) -> None:
    submitted = platform.invoke(NAME, {"tag": "stored", "lines": 4},
                                headers={"Prefer": "respond-async"})
    assert submitted.status_code == 202, submitted.text
    invocation = submitted.json()["id"]
    result = platform.http.get(f"/v1/invocations/{invocation}/result",
                               headers={"Prefer": "wait=60"})
    for _ in range(POLLS):
        if result.status_code == 200:
            break
        time.sleep(0.1)
        result = platform.http.get(f"/v1/invocations/{invocation}/result")
    assert result.status_code == 200 and result.json() == {"tag": "stored"}, result.text
    expected = [f"stored line {i}" for i in range(4)] + ["stored to stderr"]
    by_invocation = call_lines(platform, invocation, 5, f"/v1/invocations/{invocation}/logs")
    assert printed(by_invocation, "stored") == expected
    assert texts(call_lines(platform, invocation, 5)) == texts(by_invocation)

    assert platform.http.post("/v1/tenants", json={"id": "eve"}).status_code in (201, 409)
    made = platform.http.post("/v1/keys", json={"tenant": "eve", "scopes": ["admin"],
                                                "name": "eve"})
    assert made.status_code == 201, made.text
    eve = httpx.Client(base_url=platform.url, timeout=60,
                       headers={"Authorization": f"Bearer {made.json()['key']}"})
    with eve:
        for path, params in ((f"/v1/functions/{NAME}/logs", {"request": invocation}),
                             (f"/v1/invocations/{invocation}/logs", {})):
            denied = eve.get(path, params=params)
            assert denied.status_code == 404, (path, denied.text)
            assert "stored line" not in denied.text
    bad = platform.http.get(f"/v1/functions/{NAME}/logs", params={"request": "a b"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "request"
    followed = platform.http.get(f"/v1/functions/{NAME}/logs",
                                 params={"request": invocation, "follow": "true"})
    assert followed.status_code == 400 and followed.json()["error"]["field"] == "follow"
    invoke_only = platform.http.post("/v1/keys", json={"scopes": ["invoke"], "name": "inv"})
    assert invoke_only.status_code == 201, invoke_only.text
    refused = httpx.get(f"{platform.url}/v1/invocations/{invocation}/logs", timeout=60,
                        headers={"Authorization": f"Bearer {invoke_only.json()['key']}"})
    assert refused.status_code == 403, refused.text
    unknown = platform.http.get(f"/v1/functions/{NAME}/logs", params={"request": "none"})
    assert unknown.status_code == 200 and unknown.text == ""


def test_a_calls_cap_and_the_retention(platform: RunningPlatform) -> None:
    flood = platform.invoke(NAME, {"tag": "flood", "lines": MAX_CALL_LINES + 100})
    assert flood.status_code == 200, flood.text
    flood_id = flood.headers["X-Request-ID"]
    lines = call_lines(platform, flood_id, MAX_CALL_LINES)
    assert len(lines) == MAX_CALL_LINES
    assert printed(lines[:-1], "flood") == [
        f"flood line {i}" for i in range(len(printed(lines[:-1], "flood")))]
    assert (lines[-1]["stream"], lines[-1]["line"]) == ("runtime", TRUNCATED_TEXT)
    # Two calls of about 0.6 MiB each: past the function's 1 MiB the oldest calls go.
    wide = []
    for tag in ("wide-1", "wide-2"):
        answer = platform.invoke(NAME, {"tag": tag, "lines": 600, "width": 1000})
        assert answer.status_code == 200, answer.text
        wide.append(answer.headers["X-Request-ID"])
        assert len(printed(call_lines(platform, wide[-1], 601), tag)) == 601
    for gone in (flood_id, wide[0]):
        reply = platform.http.get(f"/v1/functions/{NAME}/logs", params={"request": gone})
        assert reply.status_code == 200 and reply.text == "", gone
    assert len(printed(call_lines(platform, wide[1], 601), "wide-2")) == 601


def test_every_function_answer_names_its_request(platform: RunningPlatform) -> None:
    answer = platform.invoke(NAME, {"tag": "id", "lines": 1})
    assert answer.status_code == 200
    assert len(answer.headers["X-Request-ID"]) >= 16
