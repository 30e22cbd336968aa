"""The node's HTTP data plane: the gateway forwards invocations here and they are
proxied to the instance's unix socket, streamed both ways. Served by core/http1server.py
(not aiohttp: this hop is on every invocation's path; see that module).

Routes: `POST /v1/instances/{instance}/invoke[/{path}]` (the call's own method, when
not POST, rides in X-Thaw-Method, as the gateway sent it), `GET /v1/instances`,
`GET /logs`, `GET /healthz`, `GET /metrics`.

Every route is mutual TLS under the platform's CA, like the agent's gRPC port: a client
without a certificate from it never completes the handshake, and only the gateway's
certificate is served (`DATA_PLANE_CALLERS`; another component's gets 403). Under the
development opt-out (`insecure_internal`, no identity) it is plaintext on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from urllib.parse import quote, unquote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from thaw.core.errors import InvalidArgument
from thaw.core.grpcutil import is_loopback
from thaw.core.http1 import NodeAnswer, NodeClient, NodeConnectionError
from thaw.core.http1server import (
    HTTPServer,
    Request,
    Response,
    Router,
    Streaming,
    error_response,
    json_response,
)
from thaw.core.httptls import DATA_PLANE_CALLERS, server_ssl_context
from thaw.core.pki import Identity
from thaw.platform.agent import Agent
from thaw.platform.instances import Instance, InstanceState
from thaw.platform.telemetry import TelemetryCollector

# Request headers of the gateway's call that stay at this hop (each hop's framing);
# every other one goes on to the handler (the gateway chose them:
# gateway/request.py:call_headers).
UNFORWARDED_REQUEST_HEADERS = frozenset((
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "content-length", "host", "expect"))
# After a broken connection, how long to wait for the exit watcher's reason.
EXIT_REASON_WAIT_SECONDS = 1.0
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length",
              "server", "date"}
INSTANCES_PREFIX = "/v1/instances/"
# Characters left as they are when the sub-path (decoded here) is encoded again for
# the request line; the gateway's invoke.py PATH_SAFE is the same.
PATH_SAFE = "/:@!$&'()*+,;=-._~"
# As the agent stops, how long the gateway's kept connections stay open, answering
# with `Connection: close`: a call sent on one just as it closed would be lost in
# flight, the handler maybe run, and could not be sent again (core/http1server.py).
CLOSE_LINGER_SECONDS = 1.0


def _instance_target(tail: str, query: str) -> str:
    path = "/invoke" + (f"/{quote(tail, safe=PATH_SAFE)}" if tail else "")
    return f"{path}?{query}" if query else path


class DataPlane:
    """The routes, over the agent; `start()` listens, `close()` stops. `tls`: the
    agent's identity, which the listener presents and whose CA it trusts; None only
    under insecure_internal."""

    def __init__(self, agent: Agent, tls: Identity | None) -> None:
        self.agent = agent
        self.scheme = "https" if tls is not None else "http"
        """Of the URL the node advertises (data_url)."""
        # Keep-alive connections to the instances' unix sockets: the hot path never
        # reconnects.
        self.instances_http = NodeClient()
        self.registry = CollectorRegistry()
        self.registry.register(TelemetryCollector(agent.telemetry, agent.node_id))
        router = Router()
        router.add_prefix("POST", INSTANCES_PREFIX, self.invoke)
        router.add("GET", "/v1/instances", self.list_instances)
        router.add("GET", "/logs", self.function_logs)
        router.add("GET", "/healthz", self.healthz)
        router.add("GET", "/metrics", self.metrics)
        if tls is None:
            self.server = HTTPServer(router)
        else:
            self.server = HTTPServer(router, tls=server_ssl_context(tls),
                                     callers=DATA_PLANE_CALLERS)
        self._logs_task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        if self.server.tls is None and not is_loopback(f"{host}:{port}"):
            raise InvalidArgument(
                f"insecure_internal serves the data plane in plaintext with no credential: "
                f"it listens on loopback only, not {host}; give the agent certificates "
                "(`thaw pki init`) to listen there", field="insecure_internal")
        self._logs_task = asyncio.create_task(self.agent.logs.run())
        return await self.server.start(host, port)

    async def close(self) -> None:
        self.agent.logs.close()  # followers end their streams
        await self.server.close(linger=CLOSE_LINGER_SECONDS)
        if self._logs_task is not None:
            self._logs_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._logs_task
        await self.instances_http.close()

    async def invoke(self, request: Request) -> Response | Streaming:
        began = time.perf_counter()
        instance_id, sep, rest = request.path[len(INSTANCES_PREFIX):].partition("/")
        if not sep or not (rest == "invoke" or rest.startswith("invoke/")):
            return error_response(404, "not_found", f"no route for {request.path}")
        tail = unquote(rest[len("invoke/"):]) if rest != "invoke" else ""
        inst = self.agent.instances.get(instance_id)
        if inst is None or inst.state is not InstanceState.READY:
            return error_response(503, "instance_unavailable",
                                  f"instance {instance_id} is not serving on this node")
        if inst.slots.locked():
            return error_response(429, "instance_busy",
                                  f"instance {instance_id} is at max_concurrency "
                                  f"({inst.max_concurrency})")
        headers = {name: value for name, value in request.headers.items()
                   if name not in UNFORWARDED_REQUEST_HEADERS
                   and not name.startswith("proxy-")}
        await inst.slots.acquire()
        inst.inflight += 1
        relay: _Relay | None = None
        loop = asyncio.get_running_loop()
        until = loop.time() + inst.timeout
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for runs the call in a task of
            # its own, a task and a loop turn per invocation on the hot path.
            async with asyncio.timeout_at(until):
                upstream = await self.instances_http.post_unix(
                    inst.socket, _instance_target(tail, request.query_string),
                    request.body, headers)
                out_headers = answer_headers(upstream)
                out_headers["X-Thaw-Instance"] = inst.id
                if upstream.content_length is not None:
                    try:
                        body = await upstream.read()
                    finally:
                        # Read to its end: the connection goes back for the next call.
                        upstream.release()
                    add_node_stage(out_headers, began)
                    return Response(upstream.status, body, out_headers)
                add_node_stage(out_headers, began)
            # A stream: the relay holds the slot (and the deadline) until it ends.
            relay = _Relay(self, inst, upstream, until)
            return Streaming(relay, upstream.status, out_headers)
        except TimeoutError:
            # The handler may never return: the instance is replaced, not reused.
            reason = f"the handler ran past its timeout of {inst.timeout:g}s"
            await self.agent.fail_instance(inst, reason)
            return error_response(504, "timeout", reason)
        except ConnectionError as exc:
            return error_response(502, "instance_failed", await _exit_reason(inst, exc))
        finally:
            if relay is None:
                inst.inflight -= 1
                inst.slots.release()

    async def metrics(self, request: Request) -> Response:
        await asyncio.to_thread(self.agent.sample_telemetry)
        return Response(200, generate_latest(self.registry),
                        {"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok", "node": self.agent.node_id,
                              "instances": len(self.agent.instances)})

    async def list_instances(self, request: Request) -> Response:
        return json_response({"instances": [
            {"id": i.id, "function": i.function, "version": i.version,
             "state": i.state.value, "pid": i.pid, "inflight": i.inflight}
            for i in self.agent.instances.values()]})

    async def function_logs(self, request: Request) -> Response | Streaming:
        """A function's kept log lines as NDJSON: ?function=tenant/name&since=<unix s>
        &tail=<n>&follow=1 (follow: then each new line, until the caller leaves);
        &request=<id>: one call's lines (platform/calllogs.py)."""
        logs = self.agent.logs
        query = request.query
        function = query.get("function", "")
        if "/" not in function:
            return error_response(400, "invalid_argument", "function must be tenant/name")
        try:
            since = _number(query, "since", 0.0)
            tail = int(_number(query, "tail", logs.max_lines))
        except ValueError as exc:
            return error_response(400, "invalid_argument", str(exc))
        ndjson = {"Content-Type": "application/x-ndjson"}
        if query.get("follow", "") not in ("1", "true", "yes"):
            body = "".join(json.dumps(ln.as_dict()) + "\n"
                           for ln in logs.lines(function, since, tail=tail,
                                                request=query.get("request", "")))
            return Response(200, body.encode(), ndjson)

        async def follow() -> AsyncIterator[bytes]:
            async for ln in logs.follow(function, since, tail):
                yield json.dumps(ln.as_dict()).encode() + b"\n"

        return Streaming(follow(), 200, ndjson)


class _Relay:
    """The chunks of an instance's streamed answer, as they come. It holds the call's
    slot until it is closed (at the stream's end, or when the caller leaves: closing
    the instance's connection then stops the generator at its next item)."""

    def __init__(self, plane: DataPlane, inst: Instance, upstream: NodeAnswer,
                 until: float) -> None:
        self._plane = plane
        self._inst = inst
        self._upstream = upstream
        self._until = until
        self._closed = False

    def __aiter__(self) -> _Relay:
        return self

    async def __anext__(self) -> bytes:
        try:
            async with asyncio.timeout_at(self._until):
                chunk = await self._upstream.readany()
        except TimeoutError:
            reason = f"the handler ran past its timeout of {self._inst.timeout:g}s"
            await self._plane.agent.fail_instance(self._inst, reason)
            raise NodeConnectionError(reason) from None
        # NodeConnectionError (the instance went away mid-stream) propagates: the head
        # is sent, so the server cuts the connection and the caller sees the stream end
        # unfinished.
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Read to its end: the connection goes back for the next call; else it closes.
        self._upstream.release()
        self._inst.inflight -= 1
        self._inst.slots.release()


def add_node_stage(headers: dict[str, str], began: float) -> None:
    """Add the `node` stage to the answer's Server-Timing: this hop's share of the call
    since `began` (the route, the instance's slot, its socket both ways, the answer's
    body when read here), that is, what the instance's own stages leave of it."""
    timing = headers.get("Server-Timing", "")
    instance_ms = 0.0
    for part in timing.split(","):
        _, _, params = part.partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                with contextlib.suppress(ValueError):
                    ms = float(value)
                    instance_ms += ms if math.isfinite(ms) and ms > 0 else 0.0
                break
    node_ms = max((time.perf_counter() - began) * 1000.0 - instance_ms, 0.0)
    stage = f"node;dur={node_ms:.2f}"
    headers["Server-Timing"] = f"{timing}, {stage}" if timing else stage


def answer_headers(upstream: NodeAnswer) -> dict[str, str]:
    """The instance's answer headers the gateway gets: this hop's framing left out, a
    repeated one (a handler's Response may repeat a name) joined with ", "."""
    out: dict[str, str] = {}
    for name, value in upstream.headers.items():
        if name.lower() in HOP_BY_HOP:
            continue
        previous = out.get(name)
        out[name] = value if previous is None else f"{previous}, {value}"
    return out


async def _exit_reason(inst: Instance, exc: Exception) -> str:
    """Why the connection to the instance broke: the exit watcher's reason, given a
    moment to arrive."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(inst.exited.wait(), EXIT_REASON_WAIT_SECONDS)
    return inst.exit_reason or f"connection to the instance failed: {exc}"


def _number(query: dict[str, str], key: str, default: float) -> float:
    raw = query.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key} must be a number") from None
    if not value >= 0:
        raise ValueError(f"{key} must be >= 0")
    return value
