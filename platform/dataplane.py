"""The node's HTTP data plane: the gateway forwards invocations here and they are
proxied to the instance's unix socket, streamed both ways."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from urllib.parse import quote

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from thaw.core.http1 import NodeClient, NodeConnectionError
from thaw.platform.agent import Agent
from thaw.platform.instances import Instance, InstanceState
from thaw.platform.telemetry import TelemetryCollector

AGENT_KEY = web.AppKey("agent", Agent)
INSTANCES_HTTP_KEY = web.AppKey("instances_http", NodeClient)
"""Keep-alive connections to the instances' unix sockets: the hot path never reconnects."""
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
# Headers passed from the client to the handler and back.
FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "X-Request-ID")
# After a broken connection, how long to wait for the exit watcher's reason.
EXIT_REASON_WAIT_SECONDS = 1.0
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length",
              "server", "date"}


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


# Characters left as they are when the sub-path (match_info holds it decoded) is
# encoded again for the request line; the gateway's invoke.py PATH_SAFE is the same.
PATH_SAFE = "/:@!$&'()*+,;=-._~"


def _instance_target(inst: Instance, tail: str, query: str) -> str:
    path = "/invoke" + (f"/{quote(tail, safe=PATH_SAFE)}" if tail else "")
    return f"{path}?{query}" if query else path


async def invoke(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    instance_id = request.match_info["instance"]
    inst = agent.instances.get(instance_id)
    if inst is None or inst.state is not InstanceState.READY:
        return error_response(503, "instance_unavailable",
                              f"instance {instance_id} is not serving on this node")
    if inst.slots.locked():
        return error_response(429, "instance_busy",
                              f"instance {instance_id} is at max_concurrency "
                              f"({inst.max_concurrency})")
    tail = request.match_info.get("tail", "")
    headers = {h: request.headers[h] for h in FORWARDED_REQUEST_HEADERS if h in request.headers}
    body = await request.read()
    client = request.app[INSTANCES_HTTP_KEY]
    async with inst.slots:
        inst.inflight += 1
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for runs the call in a task of
            # its own, a task and a loop turn per invocation on the hot path.
            async with asyncio.timeout(inst.timeout):
                return await _forward(request, client, inst, tail, headers, body)
        except TimeoutError:
            # The handler may never return: the instance is replaced, not reused.
            reason = f"the handler ran past its timeout of {inst.timeout:g}s"
            await agent.fail_instance(inst, reason)
            return error_response(504, "timeout", reason)
        except ConnectionError as exc:
            # Give the exit watcher a moment to record why the instance died.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(inst.exited.wait(), EXIT_REASON_WAIT_SECONDS)
            reason = inst.exit_reason or f"connection to the instance failed: {exc}"
            return error_response(502, "instance_failed", reason)
        finally:
            inst.inflight -= 1
            request["run_s"] = time.perf_counter() - started


async def _forward(request: web.Request, client: NodeClient, inst: Instance,
                   tail: str, headers: dict[str, str], body: bytes) -> web.StreamResponse:
    upstream = await client.post_unix(
        inst.socket, _instance_target(inst, tail, request.rel_url.raw_query_string), body, headers)
    try:
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        out_headers["X-Thaw-Instance"] = inst.id
        if upstream.content_length is not None:
            payload = await upstream.read()
            return web.Response(status=upstream.status, body=payload, headers=out_headers)
        response = web.StreamResponse(status=upstream.status, headers=out_headers)
        await response.prepare(request)
        try:
            while chunk := await upstream.readany():
                try:
                    await response.write(chunk)
                except ConnectionError:
                    # The caller left. Closing the instance's connection (below) stops
                    # the generator at its next item; the instance is fine and its
                    # slot is free at once.
                    return response
        except NodeConnectionError:
            # The instance went away mid-stream. The head is sent, so no 502 can
            # follow: cut the connection, and the caller sees the stream end
            # unfinished (another response here would leave it waiting forever).
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
    finally:
        # Read to its end: the connection goes back for the next call; else it closes.
        upstream.release()


async def metrics(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    await asyncio.to_thread(agent.sample_telemetry)
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return web.json_response({"status": "ok", "node": agent.node_id,
                              "instances": len(agent.instances)})


async def list_instances(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return web.json_response({"instances": [
        {"id": i.id, "function": i.function, "version": i.version, "state": i.state.value,
         "pid": i.pid, "inflight": i.inflight} for i in agent.instances.values()]},
        dumps=json.dumps)


def _number(request: web.Request, key: str, default: float) -> float:
    try:
        value = float(request.query.get(key, default))
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"{key} must be a number") from exc
    if value < 0:
        raise web.HTTPBadRequest(text=f"{key} must be >= 0")
    return value


async def function_logs(request: web.Request) -> web.StreamResponse:
    """A function's kept log lines as NDJSON: ?function=tenant/name&since=<unix s>
    &tail=<n>&follow=1 (follow: then each new line, until the caller leaves)."""
    logs = request.app[AGENT_KEY].logs
    function = request.query.get("function", "")
    if "/" not in function:
        return error_response(400, "invalid_argument", "function must be tenant/name")
    since = _number(request, "since", 0.0)
    tail = int(_number(request, "tail", logs.max_lines))
    follow = request.query.get("follow", "") in ("1", "true", "yes")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    if not follow:
        body = "".join(json.dumps(ln.as_dict()) + "\n"
                       for ln in logs.lines(function, since, tail=tail))
        await response.write(body.encode())
        await response.write_eof()
        return response
    try:
        async for ln in logs.follow(function, since, tail):
            await response.write(json.dumps(ln.as_dict()).encode() + b"\n")
    except ConnectionError:
        pass  # the caller left
    return response


async def _follow_logs(app: web.Application):  # type: ignore[no-untyped-def]
    task = asyncio.create_task(app[AGENT_KEY].logs.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _end_followers(app: web.Application) -> None:
    app[AGENT_KEY].logs.close()


async def _close_instance_connections(app: web.Application):  # type: ignore[no-untyped-def]
    app[INSTANCES_HTTP_KEY] = NodeClient()
    yield
    await app[INSTANCES_HTTP_KEY].close()


def make_app(agent: Agent) -> web.Application:
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app[AGENT_KEY] = agent
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(agent.telemetry, agent.node_id))
    app[REGISTRY_KEY] = registry
    app.cleanup_ctx.append(_close_instance_connections)
    app.cleanup_ctx.append(_follow_logs)
    app.on_shutdown.append(_end_followers)
    app.router.add_post("/v1/instances/{instance}/invoke", invoke)
    app.router.add_post("/v1/instances/{instance}/invoke/{tail:.*}", invoke)
    app.router.add_get("/v1/instances", list_instances)
    app.router.add_get("/logs", function_logs)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
