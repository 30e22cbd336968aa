"""Stored invocations and never-built functions end to end, on one platform of their
own (its file URLs last seconds, so an expiry is seen without a long wait):

- a stored (async, idempotent, webhooked) call of a handler returning a Path answers
  a signed URL, from the result route, the invocation's JSON, the webhook and a
  stored prediction; once a URL expired, the next read mints a fresh one that works
  while the invocation is retained (docs/function-api.md, "Files");
- a typed function deployed with `[snapshot] enabled = false` has no schema before
  its first start, then its calls are checked and its document lists its inputs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import FIXTURES, RunningPlatform
from tests.e2e.files_helpers import data_uri, download, short_lived_files, until
from tests.gateway.test_invocations import Receiver

# Long enough for a read and a download to happen well within it.
TTL_SECONDS = 10
ASYNC = {"Prefer": "respond-async"}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    with short_lived_files(tmp_path_factory, "thaw-stored-files", TTL_SECONDS) as started:
        yield started


def _result(platform: RunningPlatform, invocation_id: str) -> httpx.Response:
    """The invocation's result once it finished (the route waits for it)."""
    end = time.monotonic() + 300
    while True:
        resp = platform.http.get(f"/v1/invocations/{invocation_id}/result",
                                 headers={"Prefer": "wait=30"}, follow_redirects=False)
        if resp.status_code != 303:
            return resp
        assert time.monotonic() < end, "the invocation did not finish"


def _file_url(platform: RunningPlatform, value: Any) -> str:
    url = value["file"]
    assert isinstance(url, str) and url.startswith(
        platform.platform.function_url + "/files/"), value
    return url


def test_stored_results_answer_file_urls_fresh_on_each_read(
        platform: RunningPlatform) -> None:
    resp = platform.deploy(FIXTURES / "files_rt")
    assert resp.status_code == 201, resp.text
    sent = b"stored bytes"
    with Receiver(failures=0) as receiver:
        made = platform.invoke("files-rt", {"doc": data_uri(sent), "times": 2},
                               headers={**ASYNC, "X-Thaw-Webhook": receiver.url})
        assert made.status_code == 202, made.text
        invocation_id = made.json()["id"]

        # The result route: JSON with a URL that downloads the file, no API key.
        result = _result(platform, invocation_id)
        assert result.status_code == 200, result.text
        assert result.headers["Content-Type"].startswith("application/json")
        first = _file_url(platform, result.json())
        assert result.json()["size"] == len(sent)
        assert download(first).content == sent * 2

        # The invocation's JSON says the same, as JSON.
        inv = platform.http.get(f"/v1/invocations/{invocation_id}").json()
        assert inv["status"] == "succeeded"
        assert inv["result_content_type"] == "application/json"
        assert download(_file_url(platform, inv["result"])).content == sent * 2

        # The webhook carries a URL too.
        until(lambda: receiver.received, "the webhook's delivery")
        hooked = receiver.received[-1][1]
        assert hooked["id"] == invocation_id and hooked["status"] == "succeeded"
        assert download(_file_url(platform, hooked["result"])).content == sent * 2

    # The first URL expires; the result, still retained, gives a fresh one that works.
    until(lambda: download(first).status_code == 403, "the first URL's expiry")
    later = _result(platform, invocation_id)
    assert later.status_code == 200, later.text
    fresh = _file_url(platform, later.json())
    assert fresh != first
    got = download(fresh)
    assert got.status_code == 200, got.text
    assert got.content == sent * 2
    assert "out-" in got.headers["Content-Disposition"]


def test_every_stored_answer_path_gives_urls(platform: RunningPlatform) -> None:
    resp = platform.deploy(FIXTURES / "files_rt")
    assert resp.status_code == 201, resp.text

    # Async with a wait: the answer comes within it, straight from the stored outcome.
    waited = platform.invoke("files-rt", {"doc": data_uri(b"w")},
                             headers={"Prefer": "respond-async, wait=120"})
    assert waited.status_code == 200, waited.text
    assert download(_file_url(platform, waited.json())).content == b"w"

    # An Idempotency-Key: the first answer, and the same answer again (read back).
    key = {"Idempotency-Key": f"files-{time.time_ns()}"}
    once = platform.invoke("files-rt", {"doc": data_uri(b"idem")}, headers=key)
    assert once.status_code == 200, once.text
    again = platform.invoke("files-rt", {"doc": data_uri(b"idem")}, headers=key)
    assert again.status_code == 200, again.text
    for answer in (once, again):
        assert download(_file_url(platform, answer.json())).content == b"idem"

    # A stored prediction: its output's file by URL, as a sync prediction's.
    created = platform.http.post("/fn/dev/files-rt/predictions", headers=ASYNC,
                                 json={"input": {"doc": data_uri(b"predicted")}})
    assert created.status_code == 202, created.text
    pid = created.json()["id"]
    prediction: dict[str, Any] = {}

    def finished() -> bool:
        nonlocal prediction
        prediction = platform.http.get(f"/v1/predictions/{pid}").json()
        return prediction["status"] in ("succeeded", "failed", "canceled")
    until(finished, "the prediction")
    assert prediction["status"] == "succeeded", prediction
    assert download(_file_url(platform, prediction["output"])).content == b"predicted"


def test_a_never_built_function_learns_its_schema_at_its_first_start(
        platform: RunningPlatform) -> None:
    resp = platform.deploy(FIXTURES / "fresh_typed")
    assert resp.status_code == 201, resp.text
    doc_url = "/fn/dev/fresh-typed/openapi.json"

    def request_body() -> dict[str, Any]:
        doc = platform.http.get(doc_url).json()
        body: dict[str, Any] = doc["paths"]["/fn/dev/fresh-typed"]["post"]["requestBody"]
        return body

    # Not started yet: no schema (the body reaches the handler as sent).
    assert request_body()["content"]["application/json"]["schema"] == {}

    first = platform.invoke("fresh-typed", {"value": 1.5})
    assert first.status_code == 200, first.text
    assert first.json() == {"scaled": 3.0}

    assert first.headers["X-Thaw-Start"] == "fresh"

    # From the first start on (the gateway that relayed it reads the function's
    # settings again): wrong inputs are refused before any instance sees them, and
    # the document lists the inputs.
    wrong = platform.invoke("fresh-typed", {"value": "many"})
    assert wrong.status_code == 422, wrong.text
    wrong = platform.invoke("fresh-typed", {"value": 1, "times": 11})
    assert wrong.status_code == 422, wrong.text
    assert wrong.json()["error"]["field"] == "times"
    schema = request_body()["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"value", "times"}
    assert schema["required"] == ["value"]
    assert schema["properties"]["times"]["maximum"] == 10
    ok = platform.invoke("fresh-typed", {"value": 2})
    assert ok.status_code == 200 and ok.json() == {"scaled": 4.0}
