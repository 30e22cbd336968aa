"""thaw.client against httpx.MockTransport: error bodies become typed exceptions,
429/503 are retried as Retry-After says within the policy's budget, and a call that
may have run is never sent twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from thaw.client import (
    AsyncClient,
    Client,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RetryPolicy,
    ServerError,
    ThawError,
    Unauthorized,
    Unavailable,
)
from thaw.client.errors import retry_after_seconds
from thaw.core.errors import ThawError as PlatformError

URL = "http://gateway.test"
FN_URL = "http://functions.test/fn/dev/embed"


def error(status: int, code: str, message: str, field: str | None = None,
          headers: dict[str, str] | None = None) -> httpx.Response:
    body: dict[str, object] = {"code": code, "message": message}
    if field:
        body["field"] = field
    return httpx.Response(status, json={"error": body}, headers=headers)


class Recorder:
    """A transport answering from a list, recording each request; and a fake sleep."""

    def __init__(self, answers: list[httpx.Response]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []
        self.slept: list[float] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers.pop(0)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    async def async_sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def client(self, **policy: float) -> Client:
        retry = RetryPolicy(sleep=self.sleep, async_sleep=self.async_sleep, **policy)  # type: ignore[arg-type]
        return Client(URL, "k", retry=retry, transport=httpx.MockTransport(self.handler))

    def async_client(self, **policy: float) -> AsyncClient:
        retry = RetryPolicy(sleep=self.sleep, async_sleep=self.async_sleep, **policy)  # type: ignore[arg-type]
        return AsyncClient(URL, "k", retry=retry, transport=httpx.MockTransport(self.handler))


@pytest.mark.parametrize(("status", "cls"), [
    (400, InvalidInput), (422, InvalidInput), (401, Unauthorized), (403, Forbidden),
    (404, NotFound), (409, Conflict), (413, PayloadTooLarge), (500, ServerError),
    (502, ServerError), (504, ServerError), (410, ThawError)])
def test_each_status_raises_its_exception(status: int, cls: type[ThawError]) -> None:
    rec = Recorder([error(status, "some_code", "what went wrong", field="input.text")])
    with pytest.raises(cls) as raised:
        rec.client().request("GET", "/v1/functions/embed")
    exc = raised.value
    assert type(exc) is cls
    assert (exc.status, exc.code, exc.message, exc.field) == (
        status, "some_code", "what went wrong", "input.text")
    assert str(exc) == f"{status}: what went wrong"
    assert isinstance(exc, PlatformError)  # the CLI prints it as every platform error
    assert rec.requests[0].headers["Authorization"] == "Bearer k"


def test_a_body_that_is_not_the_error_shape_keeps_its_text() -> None:
    rec = Recorder([httpx.Response(500, text="upstream exploded")])
    with pytest.raises(ServerError, match="upstream exploded") as raised:
        rec.client().request("GET", "/x")
    assert raised.value.code == "error" and raised.value.field is None


def test_retry_after_is_honoured_then_the_answer_returned() -> None:
    rec = Recorder([error(429, "rate_limited", "slow down", headers={"Retry-After": "2"}),
                    error(503, "no_capacity", "full", headers={"Retry-After": "3"}),
                    httpx.Response(200, json={"ok": True})])
    assert rec.client().request("GET", "/v1/functions").json() == {"ok": True}
    assert rec.slept == [2.0, 3.0]
    assert len(rec.requests) == 3


def test_without_retry_after_the_waits_double() -> None:
    rec = Recorder([error(503, "no_capacity", "full")] * 3 + [httpx.Response(200, json=1)])
    assert rec.client(backoff=0.25).request("GET", "/x").json() == 1
    assert rec.slept == [0.25, 0.5, 1.0]


def test_attempts_are_bounded_and_the_last_error_raised() -> None:
    rec = Recorder([error(429, "rate_limited", f"try {i}", headers={"Retry-After": "1"})
                    for i in range(5)])
    with pytest.raises(RateLimited, match="try 2") as raised:
        rec.client(attempts=3).request("GET", "/x")
    assert raised.value.retry_after == 1.0
    assert len(rec.requests) == 3 and rec.slept == [1.0, 1.0]


def test_no_retry_when_retry_after_ends_past_the_budget() -> None:
    rec = Recorder([error(503, "circuit_open", "cooling down",
                          headers={"Retry-After": "120"})])
    with pytest.raises(Unavailable) as raised:
        rec.client(budget=60.0).request("GET", "/x")
    assert raised.value.retry_after == 120.0
    assert len(rec.requests) == 1 and rec.slept == []


def test_a_platform_refusal_of_a_post_is_retried() -> None:
    rec = Recorder([error(429, "overloaded", "shed", headers={"Retry-After": "1"}),
                    httpx.Response(200, json={"v": 1}, headers={"X-Thaw-Start": "warm"})])
    resp = rec.client().request("POST", FN_URL, json={"text": "a"})
    assert resp.json() == {"v": 1} and len(rec.requests) == 2
    assert json.loads(rec.requests[1].content) == {"text": "a"}


def test_a_post_the_function_answered_503_is_not_sent_again() -> None:
    # The instance ran and answered 503 itself (X-Thaw-Start is on every answer an
    # instance gave): sending it again could run it twice.
    rec = Recorder([error(503, "busy", "model still loading",
                          headers={"X-Thaw-Start": "warm", "Retry-After": "1"})])
    with pytest.raises(Unavailable, match="model still loading"):
        rec.client().request("POST", FN_URL, json={})
    assert len(rec.requests) == 1


def test_a_post_with_a_503_that_is_not_the_platforms_error_is_not_sent_again() -> None:
    rec = Recorder([httpx.Response(503, text="bad gateway page")])
    with pytest.raises(Unavailable):
        rec.client().request("POST", "/v1/functions", content=b"x")
    assert len(rec.requests) == 1


def test_a_streamed_body_is_never_sent_twice() -> None:
    rec = Recorder([error(429, "overloaded", "shed", headers={"Retry-After": "1"})])
    with pytest.raises(RateLimited):
        rec.client().request("POST", "/v1/functions", content=iter([b"a", b"b"]))
    assert len(rec.requests) == 1


def test_an_unreachable_gateway_is_unavailable_after_the_retries() -> None:
    calls: list[int] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ConnectError("connection refused", request=request)

    slept: list[float] = []
    client = Client(URL, "k", transport=httpx.MockTransport(refuse),
                    retry=RetryPolicy(attempts=2, sleep=slept.append))
    with pytest.raises(Unavailable, match="cannot reach the gateway at http://gateway.test"
                       ) as raised:
        client.request("POST", "/x", json={})
    assert len(calls) == 2 and slept == [0.5] and raised.value.status == 0


def fn_doc(request: httpx.Request) -> httpx.Response | None:
    if request.url.path == "/v1/functions/embed":
        return httpx.Response(200, json={"name": "embed", "url": FN_URL})
    return None


def routed(route: Callable[[httpx.Request], httpx.Response]) -> Client:
    def handler(request: httpx.Request) -> httpx.Response:
        return fn_doc(request) or route(request)
    return Client(URL, "k", transport=httpx.MockTransport(handler))


def test_function_call_posts_json_to_the_url_the_api_reports() -> None:
    seen: list[httpx.Request] = []

    def route(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"vector": [1, 2]})

    assert routed(route).function("embed").call(text="hi") == {"vector": [1, 2]}
    assert str(seen[0].url) == FN_URL and json.loads(seen[0].content) == {"text": "hi"}
    assert seen[0].headers["Authorization"] == "Bearer k"


def test_function_stream_yields_each_event_and_stops_at_done() -> None:
    body = b"data: one\n\ndata: two\ndata: lines\n\nevent: done\ndata:\n\ndata: after\n\n"

    def route(request: httpx.Request) -> httpx.Response:
        assert request.headers["Accept"] == "text/event-stream"
        return httpx.Response(200, content=body, headers={"Content-Type": "text/event-stream"})

    assert list(routed(route).function("embed").stream()) == ["one", "two\nlines"]


def test_an_error_event_raises() -> None:
    def route(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"data: a\n\nevent: error\ndata: boom\n\n",
                              headers={"Content-Type": "text/event-stream"})

    got: list[str] = []
    with pytest.raises(ServerError, match="the function failed midway: boom"):
        got.extend(routed(route).function("embed").stream())
    assert got == ["a"]


def test_submit_result_status_cancel() -> None:
    polls: list[str] = []

    def route(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and str(request.url) == FN_URL:
            assert request.headers["Prefer"] == "respond-async"
            return httpx.Response(202, json={"id": "inv1", "status": "queued",
                                             "url": "/v1/invocations/inv1"})
        if path == "/v1/invocations/inv1/result":
            polls.append(request.headers.get("Prefer", ""))
            if len(polls) == 1:
                return httpx.Response(303, json={"status": "running"},
                                      headers={"Location": "/v1/invocations/inv1/result"})
            return httpx.Response(200, json={"answer": 42})
        if path == "/v1/invocations/inv1":
            return httpx.Response(200, json={"id": "inv1", "status": "running"})
        if path == "/v1/invocations/inv1/cancel":
            return httpx.Response(200, json={"id": "inv1", "status": "cancelled"})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})

    handle = routed(route).function("embed").submit(x=1)
    assert handle.id == "inv1" and handle.status() == "running"
    assert handle.result(timeout=100) == {"answer": 42}
    assert polls[0].startswith("wait=") and int(polls[0][5:]) <= 100
    assert handle.cancel() == "cancelled"


def test_result_past_its_timeout_raises() -> None:
    from thaw.client import ResultTimeout

    def route(request: httpx.Request) -> httpx.Response:
        return httpx.Response(303, json={"status": "running"})

    with pytest.raises(ResultTimeout, match="did not finish within 0s"):
        routed(route).invocation("inv9").result(timeout=0)


def test_retry_after_as_a_date_or_garbage() -> None:
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
    assert retry_after_seconds("1.5") == 1.5


def test_async_client_errors_and_retries() -> None:
    rec = Recorder([error(429, "rate_limited", "slow", headers={"Retry-After": "2"}),
                    error(422, "invalid_input", "text: field required", field="text")])

    async def run() -> None:
        async with rec.async_client() as client:
            with pytest.raises(InvalidInput) as raised:
                await client.request("GET", "/x")
            assert raised.value.field == "text" and raised.value.status == 422

    asyncio.run(run())
    assert rec.slept == [2.0] and len(rec.requests) == 2


def test_async_function_call_and_stream() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        found = fn_doc(request)
        if found:
            return found
        if request.headers.get("Accept") == "text/event-stream":
            return httpx.Response(200, content=b"data: x\n\ndata: y\n\n",
                                  headers={"Content-Type": "text/event-stream"})
        return httpx.Response(200, json=json.loads(request.content))

    async def run() -> tuple[object, list[str]]:
        async with AsyncClient(URL, "k", transport=httpx.MockTransport(handler)) as client:
            fn = client.function("embed")
            return await fn.call(a=1), [e async for e in fn.stream()]

    assert asyncio.run(run()) == ({"a": 1}, ["x", "y"])


def test_a_sub_path_is_called_under_the_function_url() -> None:
    seen: list[str] = []

    def route(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, text="ok", headers={"Content-Type": "text/plain"})

    fn = routed(route).function("embed")
    assert fn.at("/v1/completions/").call() == "ok"
    assert seen == [f"{FN_URL}/v1/completions"] and fn.url == FN_URL


def test_a_bundle_past_the_cap_goes_as_the_chunks_the_tenant_lacks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    import thaw.core.bundle
    from thaw.client import protocol

    monkeypatch.setattr(thaw.core.bundle, "MAX_BUNDLE_BYTES", 8)
    monkeypatch.setattr(protocol, "CHUNK_BYTES", 4)
    bundle = b"aaaabbbbaaaacc"  # chunks aaaa, bbbb, aaaa (the same twice), cc
    digest = {c: hashlib.sha256(c).hexdigest() for c in (b"aaaa", b"bbbb", b"cc")}
    seen: list[tuple[str, str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.content))
        if request.url.path == "/v1/blobs/missing":
            asked = json.loads(request.content)["digests"]
            assert asked == [digest[b"aaaa"], digest[b"bbbb"], digest[b"cc"]]
            return httpx.Response(200, json={"missing": [digest[b"bbbb"], digest[b"cc"]]})
        if request.method == "PUT":
            return httpx.Response(204)
        assert request.url.params["force"] == "true" and request.url.params["wait"] == "true"
        return httpx.Response(201, json={"name": "big", "version": 1})

    client = Client(URL, "k", transport=httpx.MockTransport(handler))
    assert client.deploy_bundle(bundle, force=True) == {"name": "big", "version": 1}
    assert [(m, p) for m, p, _ in seen[1:3]] == [
        ("PUT", f"/v1/blobs/{digest[b'bbbb']}"), ("PUT", f"/v1/blobs/{digest[b'cc']}")]
    assert [body for _, _, body in seen[1:3]] == [b"bbbb", b"cc"]
    method, path, body = seen[3]
    assert (method, path) == ("POST", "/v1/functions/chunked") and len(seen) == 4
    assert json.loads(body) == {
        "chunks": [digest[b"aaaa"], digest[b"bbbb"], digest[b"aaaa"], digest[b"cc"]],
        "sha256": hashlib.sha256(bundle).hexdigest(), "size": len(bundle)}
