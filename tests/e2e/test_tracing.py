"""Tracing end to end on one LocalPlatform whose gateway exports OTLP to a receiver on
loopback (an aiohttp server decoding /v1/traces with opentelemetry-proto): a call that
sends a traceparent is answered in the same trace; the trace holds the gateway's spans,
the scheduler's and agent's stages of a cold start, the run, and the handler's own
OpenTelemetry spans, linked parent to child, with the platform's attributes; a warm
call's trace has no start; the trace context reached the agent over gRPC (its log
line of the start names the trace); GET /v1/traces lists and gives them, a tenant its
own only."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tests.conftest import EXAMPLES, FIXTURES, RunningPlatform, running
from thaw.ops.services import LocalPlatform

NAME = "otel-spans"
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
# Bounds for waiting on the exporter (it batches every OTEL_BSP_SCHEDULE_DELAY ms).
EXPORT_WAIT_SECONDS = 30.0


@dataclass
class Receiver:
    """What the OTLP receiver took in: span name, ids, attributes and service, per trace."""

    url: str = ""
    spans: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def trace(self, trace_id: str, names: set[str]) -> dict[str, dict[str, Any]]:
        """The trace's spans by name once `names` have all arrived."""
        deadline = time.monotonic() + EXPORT_WAIT_SECONDS
        while True:
            with self.lock:
                got = {s["name"]: s for s in self.spans if s["trace_id"] == trace_id}
            if names <= set(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.1)


def _value(any_value: Any) -> Any:
    return getattr(any_value, any_value.WhichOneof("value"))


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    got = Receiver()
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def traces(request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        with got.lock:
            for resource_spans in message.resource_spans:
                service = {a.key: _value(a.value) for a in
                           resource_spans.resource.attributes}["service.name"]
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        got.spans.append({
                            "name": s.name, "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                            "service": service, "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in s.attributes}})
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse()
                            .SerializeToString(), content_type="application/x-protobuf")

    async def serve() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        got.url = f"http://127.0.0.1:{port}"
        return runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(serve())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield got
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
           ) -> Iterator[RunningPlatform]:
    """A platform whose services see the standard OpenTelemetry variables."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        home = tmp_path_factory.mktemp("thaw-traced")
        with running(LocalPlatform(home, gateway_port=0, host_devices=None,
                                   log_dir=home / "logs")) as platform:
            yield platform


def _check_attributes(span: dict[str, Any], start: str) -> None:
    attrs = span["attributes"]
    assert attrs["thaw.function"] == f"dev/{NAME}", span
    assert attrs["thaw.start"] == start, span
    assert attrs["thaw.instance"] and attrs["thaw.version"] >= 1, span


def test_cold_and_warm_calls_are_traced_end_to_end(traced: RunningPlatform,
                                                   receiver: Receiver) -> None:
    assert traced.deploy(FIXTURES / "otel_spans").status_code == 201
    caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    cold = traced.invoke(NAME, headers={"traceparent": caller, "tracestate": "v=1"})
    assert cold.status_code == 200, cold.text
    assert cold.headers["traceparent"].startswith(f"00-{CALLER_TRACE}-")
    start = cold.headers["X-Thaw-Start"]
    assert start in ("restore", "fresh")
    # The handler ran inside the trace, under the gateway's run span.
    seen = cold.json()
    assert seen["trace_id"] == CALLER_TRACE
    assert seen["traceparent"].startswith(f"00-{CALLER_TRACE}-")

    names = {f"invoke dev/{NAME}", "admission", "acquire", "queue", "placement",
             f"start {start}", "run", "relay", "handler-work", "handler-step"}
    spans = receiver.trace(CALLER_TRACE, names)
    assert names <= set(spans), sorted(spans)
    root = spans[f"invoke dev/{NAME}"]
    assert root["parent"] == CALLER_SPAN and root["service"] == "thaw-gateway"
    assert cold.headers["traceparent"] == f"00-{CALLER_TRACE}-{root['span_id']}-01"
    for name in ("admission", "acquire", "run", "relay"):
        assert spans[name]["parent"] == root["span_id"], name
    acquire = spans["acquire"]
    assert spans["queue"]["parent"] == acquire["span_id"]
    assert spans["placement"]["service"] == "thaw-scheduler"
    begun = spans[f"start {start}"]
    assert begun["parent"] == acquire["span_id"] and begun["service"] == "thaw-agent"
    agent_stages = [s for s in spans.values() if s["parent"] == begun["span_id"]]
    assert agent_stages and all(s["service"] == "thaw-agent" for s in agent_stages)
    if start == "restore":
        assert "restore" in {s["name"] for s in agent_stages}
    run = spans["run"]
    assert seen["traceparent"] == f"00-{CALLER_TRACE}-{run['span_id']}-01"
    work = spans["handler-work"]
    assert work["parent"] == run["span_id"] and work["service"] == "thaw-instance"
    assert work["attributes"] == {"work.items": 3}
    assert spans["handler-step"]["parent"] == work["span_id"]
    assert root["start"] <= run["start"] <= work["start"] <= work["end"] <= root["end"]
    for span in spans.values():
        if span["service"] != "thaw-instance":
            _check_attributes(span, start)

    # The scheduler passed the context on to the agent over gRPC: its start's log line
    # carries the trace.
    log = traced.platform.log_of("agent local")
    assert log is not None and CALLER_TRACE in Path(log).read_text(errors="replace")

    # A warm call without a traceparent: a new trace, no start in it.
    warm = traced.invoke(NAME)
    assert warm.status_code == 200 and warm.headers["X-Thaw-Start"] == "warm"
    trace_id = warm.headers["traceparent"].split("-")[1]
    assert trace_id != CALLER_TRACE and warm.json()["trace_id"] == trace_id
    names = {f"invoke dev/{NAME}", "admission", "acquire", "queue", "run", "relay",
             "handler-work"}
    spans = receiver.trace(trace_id, names)
    assert names <= set(spans), sorted(spans)
    assert not any(n.startswith("start ") or n == "placement" for n in spans)
    assert spans[f"invoke dev/{NAME}"]["parent"] == ""
    _check_attributes(spans["run"], "warm")

    # The gateway's own ring: the tenant lists and reads its traces.
    listed = traced.http.get("/v1/traces", params={"function": NAME, "limit": 5})
    assert listed.status_code == 200, listed.text
    ids = [t["trace_id"] for t in listed.json()["traces"]]
    assert ids[:2] == [trace_id, CALLER_TRACE]
    one = traced.http.get(f"/v1/traces/{CALLER_TRACE}").json()
    assert one["function"] == f"dev/{NAME}" and one["parent_span_id"] == CALLER_SPAN
    got = {s["name"]: s for s in one["spans"]}
    assert got["handler-work"]["component"] == "instance"
    assert got["handler-work"]["parent_id"] == got["run"]["span_id"]
    assert traced.http.get(f"/v1/traces/{'1' * 32}").status_code == 404
    assert traced.http.get("/v1/traces/nothex").status_code == 400


def test_errors_and_both_servers_carry_traceparent(traced: RunningPlatform) -> None:
    caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    missing = traced.http.post("/fn/dev/no-such-function", json={},
                               headers={"traceparent": caller})
    assert missing.status_code == 404
    assert missing.headers["traceparent"].startswith(f"00-{CALLER_TRACE}-")
    # aiohttp's route (Prefer sends the call there) answers in the caller's trace too.
    slow = traced.http.post(f"/fn/dev/{NAME}", json={},
                            headers={"traceparent": caller, "Prefer": "wait=60"})
    assert slow.status_code == 200, slow.text
    assert slow.headers["traceparent"].startswith(f"00-{CALLER_TRACE}-")
    bad = traced.http.post(f"/fn/dev/{NAME}", json={}, headers={"traceparent": "junk"})
    assert bad.status_code == 200
    assert CALLER_TRACE not in bad.headers["traceparent"]
    assert len(bad.headers["traceparent"].split("-")[1]) == 32


def _in_trace(platform: RunningPlatform, response: httpx.Response, trace: str,
              names: set[str]) -> dict[str, dict[str, Any]]:
    """The answer named the caller's trace, and the gateway's ring holds that trace
    with `names` among its spans (a stored run's spans once it ends)."""
    assert response.headers["traceparent"].startswith(f"00-{trace}-"), response.headers
    deadline = time.monotonic() + EXPORT_WAIT_SECONDS
    while True:
        got = platform.http.get(f"/v1/traces/{trace}")
        spans = {s["name"]: s for s in got.json()["spans"]} if got.status_code == 200 else {}
        if names <= set(spans) or time.monotonic() > deadline:
            assert names <= set(spans), (got.status_code, sorted(spans))
            return spans
        time.sleep(0.1)


def test_every_call_route_and_stored_call_is_traced(traced: RunningPlatform) -> None:
    for bundle in (EXAMPLES / "tinylm", FIXTURES / "tensor_math", FIXTURES / "typed_small"):
        made = traced.deploy(bundle)
        assert made.status_code == 201, made.text
    key = {"Authorization": f"Bearer {traced.key}"}

    def caller(n: int) -> tuple[str, dict[str, str]]:
        trace = f"{n:032x}"
        return trace, {**key, "traceparent": f"00-{trace}-{CALLER_SPAN}-01"}

    with httpx.Client(base_url=traced.platform.function_url, timeout=120) as fn:
        trace, headers = caller(0xC4A7)
        chat = fn.post("/v1/chat/completions", headers=headers, json={
            "model": "tinylm", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}]})
        assert chat.status_code == 200, chat.text
        spans = _in_trace(traced, chat, trace, {"invoke dev/tinylm", "run", "relay"})
        assert spans["invoke dev/tinylm"]["parent_id"] == CALLER_SPAN

        trace, headers = caller(0x0719)
        infer = fn.post("/v2/models/tensor-math/infer", headers=headers, json={"inputs": [
            {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]},
            {"name": "tag", "shape": [1], "datatype": "BYTES", "data": ["a"]}]})
        assert infer.status_code == 200, infer.text
        _in_trace(traced, infer, trace, {"invoke dev/tensor-math", "run"})

        trace, headers = caller(0x9BED)
        predicted = fn.post("/fn/dev/typed-small/predictions", headers=headers,
                            json={"input": {"text": "four"}})
        assert predicted.status_code == 200, predicted.text
        assert predicted.json()["output"] == {"length": 4}
        _in_trace(traced, predicted, trace, {"invoke dev/typed-small", "run"})

        # Stored: the run happens in the runner's task, in the caller's trace, its
        # root a child of the submitting call's.
        trace, headers = caller(0xA5C)
        accepted = fn.post("/fn/dev/typed-small", json={"text": "stored"},
                           headers={**headers, "Prefer": "respond-async"})
        assert accepted.status_code == 202, accepted.text
        spans = _in_trace(traced, accepted, trace, {"run"})
        inv = accepted.json()["id"]
        shown = traced.http.get(f"/v1/invocations/{inv}")
        assert shown.status_code == 200 and shown.json()["trace_id"] == trace, shown.text
        every = traced.http.get(f"/v1/traces/{trace}").json()["spans"]
        roots = [s for s in every if s["name"] == "invoke dev/typed-small"]
        submitted = next(s for s in roots if s["parent_id"] == CALLER_SPAN)
        ran = next(s for s in roots if s["parent_id"] == submitted["span_id"])
        assert spans["run"]["parent_id"] == ran["span_id"]

    # A management route: in the caller's trace, on a span of its own; without a
    # traceparent, a new trace.
    trace, headers = caller(0x3A7)
    listed = traced.http.get("/v1/functions", headers={"traceparent": headers["traceparent"]})
    assert listed.status_code == 200
    assert listed.headers["traceparent"].startswith(f"00-{trace}-")
    assert not listed.headers["traceparent"].endswith(f"-{CALLER_SPAN}-01")
    fresh = traced.http.get("/v1/functions").headers["traceparent"]
    assert len(fresh.split("-")[1]) == 32 and trace not in fresh
