"""Tracing's parts alone: W3C trace context parsing, the ring of recent traces, OTLP
export through the SDK (its in-memory exporter), the spans a settled exchange makes,
trace context over internal gRPC, and the instance's side (in a subprocess: it sets
the global tracer provider)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from thaw.core.config import GatewayConfig
from thaw.core.errors import InvalidArgument
from thaw.core.grpcutil import internal_server, secure_channel
from thaw.core.tracing import (
    DEFAULT_TRACES_KEPT,
    MAX_SPANS_PER_TRACE,
    REMOTE,
    OtlpExport,
    SpanRecord,
    Trace,
    TraceRing,
    instance_spans,
    parse_traceparent,
)
from thaw.gateway import tracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_traceparent_parsing_follows_w3c() -> None:
    parent = parse_traceparent(f"00-{TRACE}-{PARENT}-01", "vendor=x")
    assert parent is not None
    assert (parent.trace_id, parent.span_id, parent.flags, parent.state) == (
        TRACE, PARENT, 1, "vendor=x")
    assert parent.child("1" * 16).header() == f"00-{TRACE}-{'1' * 16}-01"
    for bad in ("", "garbage", f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-{'0' * 16}-01",
                f"ff-{TRACE}-{PARENT}-01", f"00-{TRACE.upper()}-{PARENT}-01",
                f"00-{TRACE}-{PARENT}-01-extra"):
        assert parse_traceparent(bad) is None, bad
    # A later version may add fields after the flags.
    later = parse_traceparent(f"01-{TRACE}-{PARENT}-00-more")
    assert later is not None and later.flags == 0


def _trace(trace_id: str, tenant: str = "t", function: str = "t/f", spans: int = 1) -> Trace:
    return Trace(trace_id, tenant, function, "", [
        SpanRecord(f"s{i}", f"{i + 1:016x}", "", 10 + i, 20 + i) for i in range(spans)])


def test_ring_keeps_the_last_traces_per_tenant() -> None:
    ring = TraceRing(3)
    for i in range(5):
        ring.add(_trace(f"{i:032x}", tenant="a" if i % 2 else "b"))
    assert len(ring) == 3 and ring.get(f"{0:032x}") is None
    assert [t.trace_id for t in ring.recent()] == [f"{i:032x}" for i in (4, 3, 2)]
    assert [t.trace_id for t in ring.recent(tenant="a")] == [f"{3:032x}"]
    assert ring.recent(function="t/other") == []
    # One trace's calls share an entry, bounded in spans.
    ring.add(_trace(f"{4:032x}", tenant="b", spans=MAX_SPANS_PER_TRACE))
    kept = ring.get(f"{4:032x}")
    assert kept is not None and len(kept.spans) == MAX_SPANS_PER_TRACE
    assert TraceRing(0).recent() == []


def test_pending_spans_are_built_once_and_shared() -> None:
    built: list[int] = []
    records = [SpanRecord("x", "a" * 16, "", 1, 2)]

    def build() -> list[SpanRecord]:
        built.append(1)
        return records

    class Once:
        done: list[SpanRecord] | None = None

        def spans(self) -> list[SpanRecord]:
            if self.done is None:
                self.done = build()
            return self.done

    once = Once()
    ring = TraceRing(2)
    first = Trace(TRACE, "t", "t/f", "", pending=[once.spans])
    ring.add(first)
    ring.add(Trace(TRACE, "t", "t/f", "", pending=[Once().spans]))  # the same trace
    kept = ring.get(TRACE)
    assert kept is first and len(kept.pending) == 2
    assert [s.name for s in kept.records()] == ["x", "x"] and not kept.pending
    assert first.records() is kept.spans and len(built) == 2


def test_otlp_export_builds_sdk_spans_off_the_loop() -> None:
    exporter = InMemorySpanExporter()
    export = OtlpExport(exporter, schedule_delay_millis=10)
    root = SpanRecord("invoke t/f", "a" * 16, PARENT, 1_000, 9_000, "gateway",
                      {"thaw.function": "t/f", "thaw.start": "warm"}, kind="server")
    child = SpanRecord("restore", "b" * 16, "a" * 16, 2_000, 3_000, "agent", error="boom")
    export.submit(Trace(TRACE, "t", "t/f", PARENT, [root, child]))
    assert export.flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"invoke t/f", "restore"}
    got_root, got_child = spans["invoke t/f"], spans["restore"]
    assert got_root.context is not None and got_child.parent is not None
    assert f"{got_root.context.trace_id:032x}" == TRACE
    assert f"{got_child.parent.span_id:016x}" == "a" * 16
    assert got_root.parent is not None and f"{got_root.parent.span_id:016x}" == PARENT
    assert (got_root.start_time, got_root.end_time) == (1_000, 9_000)
    assert got_root.attributes == {"thaw.function": "t/f", "thaw.start": "warm"}
    assert got_root.resource.attributes["service.name"] == "thaw-gateway"
    assert got_child.resource.attributes["service.name"] == "thaw-agent"
    assert not got_child.status.is_ok and got_child.status.description == "boom"
    export.shutdown()


def test_instance_spans_are_checked_not_trusted() -> None:
    good = {"n": "work", "s": "c" * 16, "p": None, "b": 5, "e": 6, "a": {"k": 1, "o": {}}}
    payload = json.dumps([good, {"n": "bad", "s": "xyz", "b": 1, "e": 2}, "junk"])
    spans = instance_spans(payload, "d" * 16)
    assert [(s.name, s.parent_id, s.component, s.attributes) for s in spans] == [
        ("work", "d" * 16, "instance", {"k": 1})]
    assert instance_spans("not json", "d" * 16) == []


def _exchange(start: str, stages: list[tuple[str, float]], spans: str = "") -> Any:
    lease = SimpleNamespace(version=3, instance_id="i-1", node_id="n-1")
    call = SimpleNamespace(function="t/f", request_id="r-1")
    upstream = SimpleNamespace(headers={tracing.SPANS_HEADER: spans} if spans else {})
    return SimpleNamespace(call=call, lease=lease, start=start, stages=stages, status=200,
                           started=10.0, sent=12.0, opened=12.5, run_span="e" * 16,
                           upstream=upstream)


def _call_trace(parent: str | None) -> tracing.CallTrace:
    trace = tracing.CallTrace(parse_traceparent(parent))
    trace.begun, trace.begun_ns = 9.0, 1_000_000_000_000
    return trace


def test_cold_exchange_spans_come_from_the_stages() -> None:
    trace = _call_trace(f"00-{TRACE}-{PARENT}-01")
    carried = json.dumps([{"n": "handler", "s": "f" * 16, "b": 1, "e": 2}])
    ex = _exchange("restore", [("queue", 0.5), ("fetch", 0.25), ("restore", 0.75),
                               ("prefault", 0.25)], carried)
    measured = tracing.Settled(trace, ex, 13.0, "answered")
    spans = {s.name: s for s in tracing.exchange_spans(measured)}
    root = spans["invoke t/f"]
    assert root.parent_id == PARENT and root.span_id == trace.root_id
    assert root.kind == "server" and root.attributes["http.response.status_code"] == 200
    for name in ("admission", "acquire", "run", "relay"):
        assert spans[name].parent_id == root.span_id, name
    acquire = spans["acquire"]
    for name in ("queue", "placement", "start restore"):
        assert spans[name].parent_id == acquire.span_id, name
    start = spans["start restore"]
    for name in ("fetch", "restore", "prefault"):
        assert spans[name].parent_id == start.span_id and spans[name].component == "agent"
    assert spans["queue"].component == "scheduler"
    # Laid end to end: the stages as measured, placement the rest of the wait.
    ns = 1_000_000_000
    assert spans["queue"].start_ns == trace.begun_ns + ns
    assert spans["placement"].end_ns - spans["placement"].start_ns == ns // 4
    assert spans["prefault"].end_ns == trace.begun_ns + 3 * ns
    assert spans["run"].span_id == "e" * 16
    assert spans["handler"].parent_id == "e" * 16
    for span in spans.values():
        if span.component != "instance":
            assert span.attributes["thaw.function"] == "t/f"
            assert span.attributes["thaw.version"] == 3
            assert span.attributes["thaw.instance"] == "i-1"
            assert span.attributes["thaw.start"] == "restore"


def test_warm_exchange_has_no_start() -> None:
    trace = _call_trace(None)
    spans = tracing.exchange_spans(tracing.Settled(trace, _exchange("warm", [("queue", 0.0)]),
                                                   13.0, "answered"))
    assert [s.name for s in spans] == ["invoke t/f", "admission", "acquire", "queue", "run",
                                       "relay"]
    assert spans[0].parent_id == "" and len(trace.trace_id) == 32
    assert spans[3].component == "gateway"


def test_grpc_carries_trace_context_to_the_calls_made_meanwhile() -> None:
    async def scenario() -> tuple[str, str, str]:
        seen: dict[str, str] = {}

        async def inner(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = dict(context.invocation_metadata() or ())
            seen["inner"] = str(metadata.get("traceparent", ""))
            return b""

        async def outer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            parent = REMOTE.get()
            seen["outer"] = parent.header() if parent else ""
            await channel.unary_unary("/t.T/Inner")(b"")
            return b""

        server = internal_server(None)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
            "Outer": grpc.unary_unary_rpc_method_handler(outer),
            "Inner": grpc.unary_unary_rpc_method_handler(inner)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = secure_channel(f"127.0.0.1:{port}", None, "agent")
        try:
            header = f"00-{TRACE}-{PARENT}-01"
            await channel.unary_unary("/t.T/Outer")(b"", metadata=(("traceparent", header),))
            untraced = seen.copy()
            await channel.unary_unary("/t.T/Outer")(b"")
        finally:
            await channel.close()
            await server.stop(None)
        return untraced["outer"], untraced["inner"], seen["inner"]

    outer, inner, after = asyncio.run(scenario())
    assert outer == inner == f"00-{TRACE}-{PARENT}-01"
    assert after == ""  # a call without context passes none on


_INSTANCE = textwrap.dedent("""
    import json, sys
    {block}
    from thaw.snapshotter.runtime.trace import call_context, spans_header
    headers = {{"traceparent": "00-{trace}-{parent}-01"}}
    with call_context(headers) as spans:
        if spans is not None:
            from opentelemetry import trace
            tracer = trace.get_tracer("fn")
            with tracer.start_as_current_span("outer", attributes={{"k": "v"}}):
                with tracer.start_as_current_span("inner") as span:
                    span.set_attribute("n", 3)
                    ctx = span.get_span_context()
                    assert f"{{ctx.trace_id:032x}}" == "{trace}"
            try:
                with tracer.start_as_current_span("fails"):
                    raise ValueError("no")
            except ValueError:
                pass
    # Outside any call: nothing is collected or sent.
    with call_context({{}}) as none:
        assert none is None
    print(spans_header(spans))
""")


def _run_instance(block: str = "") -> str:
    code = _INSTANCE.format(block=block, trace=TRACE, parent=PARENT)
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip()


def test_instance_sends_the_handlers_spans_back() -> None:
    line = _run_instance()
    name, _, payload = line.partition(": ")
    assert name == tracing.SPANS_HEADER
    spans = {s["n"]: s for s in json.loads(payload)}
    assert set(spans) == {"outer", "inner", "fails"}
    assert spans["outer"]["p"] == PARENT and spans["inner"]["p"] == spans["outer"]["s"]
    assert spans["inner"]["a"] == {"n": 3} and spans["outer"]["a"] == {"k": "v"}
    assert spans["fails"]["x"].startswith("ValueError")
    assert spans["inner"]["b"] <= spans["inner"]["e"]


def test_instance_without_opentelemetry_is_untouched() -> None:
    assert _run_instance("sys.modules['opentelemetry'] = None") == ""


@pytest.mark.parametrize("kept", ["-1", "many", "100001"])
def test_traces_kept_setting_is_checked(kept: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THAW_TRACES_KEPT", kept)
    with pytest.raises(InvalidArgument, match="traces_kept") as err:
        GatewayConfig.load()
    assert err.value.field == "traces_kept"


def test_tracing_settings_come_from_the_gateway_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THAW_TRACES_KEPT", "7")
    monkeypatch.setenv("THAW_TRACING", "false")
    config = GatewayConfig.load()
    assert (config.traces_kept, config.tracing) == (7, False)
    try:
        tracing.configure(config.tracing, config.traces_kept)
        assert tracing.begin({}) is None
        assert tracing.sink().ring.capacity == 7
    finally:
        tracing.configure(True, DEFAULT_TRACES_KEPT)


def test_concurrent_first_calls_install_the_instances_provider_once() -> None:
    # A fresh interpreter: the provider is process-wide, as in an instance.
    probe = (
        "import logging, threading\n"
        "logging.basicConfig()\n"
        "from thaw.snapshotter.runtime import trace\n"
        "gate = threading.Barrier(8)\n"
        "def first():\n"
        "    gate.wait(); trace._api()\n"
        "threads = [threading.Thread(target=first) for _ in range(8)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "from opentelemetry import trace as otel\n"
        "print(type(otel.get_tracer_provider()).__name__)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, timeout=60)
    assert "Overriding" not in done.stderr, done.stderr
    assert done.stdout.strip() != "ProxyTracerProvider"


def test_stored_call_carries_its_callers_context_to_its_run() -> None:
    caller = f"00-{'ab' * 16}-{'cd' * 8}-01"
    submitting = tracing.begin({"traceparent": caller})
    assert submitting is not None
    token = tracing.CURRENT.set(submitting)
    try:
        # A caller's own header in another case is replaced, never doubled.
        stored = tracing.stored_headers({"Traceparent": "junk", "Accept": "x"})
    finally:
        tracing.CURRENT.reset(token)
    assert stored == {"Accept": "x",
                      "traceparent": f"00-{'ab' * 16}-{submitting.root_id}-01"}
    assert tracing.trace_id_of(stored) == "ab" * 16
    assert tracing.trace_id_of({}) == "" and tracing.stored_headers({"a": "b"}) == {"a": "b"}
    with tracing.stored_run("dev", "fn", stored):
        run = tracing.CURRENT.get()
        assert run is not None and run.trace_id == "ab" * 16
        assert run.remote_parent == submitting.root_id and run.tenant == "dev"
    assert tracing.CURRENT.get() is None
    with tracing.stored_run("dev", "fn", {}):  # a schedule's run: a trace of its own
        own = tracing.CURRENT.get()
        assert own is not None and own.trace_id != "ab" * 16 and own.remote_parent == ""


def test_answers_of_routes_that_call_nothing_name_the_callers_trace() -> None:
    def request(headers: dict[str, str]) -> Any:
        return SimpleNamespace(headers=headers, get=lambda key, default=None: default)

    caller = f"00-{'ab' * 16}-{'cd' * 8}-00"
    answered = tracing.answer_traceparent(request({"traceparent": caller}))
    assert answered is not None
    version, trace_id, span_id, flags = answered.split("-")
    assert (version, trace_id, flags) == ("00", "ab" * 16, "00") and span_id != "cd" * 8
    fresh = tracing.answer_traceparent(request({}))
    assert fresh is not None and parse_traceparent(fresh) is not None
    assert "ab" * 16 not in fresh
    tracing.set_sink(None, tracing_on=False)
    try:
        assert tracing.answer_traceparent(request({"traceparent": caller})) is None
    finally:
        tracing.set_sink(None)
