"""Snapshots and node drains for the CLI: GET /v1/snapshots, GET /v1/snapshots/{name},
POST /v1/functions/{name}/verify (and prewarm's progress stream, see app.py's
prewarm_function), POST /v1/nodes/{node}/drain, POST /v1/nodes/gc and
/v1/nodes/{node}/gc.

Verify and prewarm run on each node holding the snapshot in turn and report
progress; with `Accept: application/x-ndjson` every progress message is a line
(bytes done and total per node), then a summary line with `"done": true`;
otherwise the answer is that summary alone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from thaw.core.errors import ThawError
from thaw.core.grpcutil import call, stream
from thaw.gateway.auth import require, require_operator
from thaw.gateway.caller import principal_of
from thaw.gateway.errors import error_body
from thaw.gateway.openapi import _errors, _json
from thaw.gateway.state import GATEWAY_KEY
from thaw.gateway.views import node_json
from thaw.proto import agent_pb2, manifest_pb2, scheduler_pb2, scheduler_pb2_grpc

NDJSON = "application/x-ndjson"
# A pass over a large snapshot on several nodes reads every byte of it on each.
PASS_TIMEOUT_SECONDS = 3600.0
META_TIMEOUT_SECONDS = 30.0


def _stub(request: web.Request) -> scheduler_pb2_grpc.SchedulerStub:
    return scheduler_pb2_grpc.SchedulerStub(request.app[GATEWAY_KEY].scheduler.channel)


async def _principal(request: web.Request) -> scheduler_pb2.Principal:
    return await principal_of(request)


def snapshot_json(info: scheduler_pb2.SnapshotInfo) -> dict[str, Any]:
    return {"function": info.function, "name": info.function.split("/", 1)[-1],
            "version": info.version, "id": info.snapshot_id, "state": info.state,
            "stored_bytes": info.stored_bytes, "raw_bytes": info.raw_bytes,
            "chunks": info.chunks, "disk_nodes": list(info.disk_nodes),
            "pinned_nodes": list(info.pinned_nodes)}


def manifest_summary(m: manifest_pb2.SnapshotManifest) -> dict[str, Any]:
    compressions = sorted({manifest_pb2.Compression.Name(c.compression).removeprefix(
        "COMPRESSION_").lower() for a in (m.pickle, m.host, m.device) for c in a.chunks})
    arenas = {}
    for name in ("pickle", "host", "device"):
        arena = getattr(m, name)
        arenas[name] = {"size": arena.size, "chunks": len(arena.chunks),
                        "stored_bytes": sum(c.stored_length for c in arena.chunks)}
    fp = m.fingerprint
    return {"format": m.format, "arenas": arenas, "compression": compressions,
            "storages": len(m.storages), "modules": len(m.modules),
            "fingerprint": {"python": fp.python, "torch": fp.torch, "numpy": fp.numpy,
                            "device_type": fp.device_type, "gpu_model": fp.gpu_model,
                            "driver": fp.driver, "function_version": fp.function_version},
            "setup_seconds": m.setup_seconds, "import_seconds": m.import_seconds,
            "capture_seconds": m.capture_seconds}


async def list_snapshots(request: web.Request) -> web.Response:
    p = await _principal(request)
    require(p, "deploy")
    reply = await call(_stub(request).ListSnapshots(
        scheduler_pb2.ListFunctionsRequest(tenant=p.tenant), timeout=META_TIMEOUT_SECONDS))
    return web.json_response({"snapshots": [snapshot_json(s) for s in reply.snapshots]})


async def get_snapshot(request: web.Request) -> web.Response:
    p = await _principal(request)
    require(p, "deploy")
    info = await call(_stub(request).GetSnapshot(scheduler_pb2.FunctionRequest(
        tenant=p.tenant, name=request.match_info["name"]), timeout=META_TIMEOUT_SECONDS))
    return web.json_response({**snapshot_json(info),
                              "manifest": manifest_summary(info.manifest)})


def progress_json(m: agent_pb2.SnapshotProgress) -> dict[str, Any]:
    return {"node": m.node_id, "done_bytes": m.done_bytes, "total_bytes": m.total_bytes,
            "done_chunks": m.done_chunks, "total_chunks": m.total_chunks,
            "seconds": round(m.seconds, 4), "finished": m.finished,
            "bad": [{"digest": b.digest, "tier": b.tier, "reason": b.reason} for b in m.bad],
            "error": m.error}


class _Summary:
    def __init__(self) -> None:
        self.nodes: list[str] = []
        self.bytes = 0
        self.seconds = 0.0
        self.bad: list[dict[str, str]] = []
        self.errors: list[dict[str, str]] = []

    def add(self, m: agent_pb2.SnapshotProgress) -> None:
        if not m.finished:
            return
        self.nodes.append(m.node_id)
        self.bytes += m.done_bytes
        self.seconds += m.seconds
        self.bad += [{"node": m.node_id, "digest": b.digest, "tier": b.tier,
                      "reason": b.reason} for b in m.bad]
        if m.error:
            self.errors.append({"node": m.node_id, "error": m.error})

    def as_dict(self, kind: str) -> dict[str, Any]:
        ok = not self.bad and not self.errors and bool(self.nodes)
        if not self.nodes:
            self.errors.append({"node": "", "error": "no node holds this snapshot"})
        return {"done": True, "kind": kind, "ok": ok, "nodes": self.nodes,
                "bytes": self.bytes, "seconds": round(self.seconds, 4),
                "bad": self.bad, "errors": self.errors}


async def _progress(request: web.Request, kind: str
                    ) -> AsyncIterator[agent_pb2.SnapshotProgress]:
    p = await _principal(request)
    require(p, "deploy")
    stub = _stub(request)
    method = stub.PrewarmProgress if kind == "prewarm" else stub.VerifySnapshot
    async for message in stream(method(scheduler_pb2.PrewarmRequest(
            tenant=p.tenant, name=request.match_info["name"],
            node_id=request.query.get("node", "")), timeout=PASS_TIMEOUT_SECONDS)):
        yield message


async def snapshot_pass(request: web.Request, kind: str) -> web.StreamResponse:
    """Run a prewarm or verify pass; NDJSON progress if the client accepts it."""
    summary = _Summary()
    messages = _progress(request, kind)
    if NDJSON not in request.headers.get("Accept", ""):
        async for m in messages:
            summary.add(m)
        return web.json_response(summary.as_dict(kind))
    # The first message (or the error before it) decides the status.
    first = await anext(messages, None)
    response = web.StreamResponse(headers={"Content-Type": NDJSON,
                                           "Cache-Control": "no-store"})
    await response.prepare(request)
    try:
        if first is not None:
            summary.add(first)
            await response.write(json.dumps(progress_json(first)).encode() + b"\n")
            async for m in messages:
                summary.add(m)
                await response.write(json.dumps(progress_json(m)).encode() + b"\n")
        await response.write(json.dumps(summary.as_dict(kind)).encode() + b"\n")
    except ThawError as exc:
        # The head is sent: the error is the stream's last line.
        await response.write(json.dumps(error_body(exc.code, exc.message)).encode() + b"\n")
    except ConnectionError:
        return response  # the caller left; the nodes finish their pass
    await response.write_eof()
    return response


async def verify_function(request: web.Request) -> web.StreamResponse:
    return await snapshot_pass(request, "verify")


async def drain_node(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    require_operator(await _principal(request), gw.config)
    reply = await call(_stub(request).Drain(scheduler_pb2.DrainRequest(
        node_id=request.match_info["node"]), timeout=META_TIMEOUT_SECONDS))
    return web.json_response({"node": node_json(reply.node), "stopped": reply.stopped,
                              "finishing": reply.finishing})


# A collection walks each node's bundles, builds and logs (scheduler/gc.py's limit).
GC_TIMEOUT_SECONDS = 1800.0


def garbage_json(g: scheduler_pb2.NodeGarbage) -> dict[str, Any]:
    return {"node": g.node_id, "freed_bytes": g.freed_bytes, "error": g.error,
            "freed": [{"kind": f.kind, "items": f.items, "bytes": f.bytes}
                      for f in g.freed]}


async def collect_garbage(request: web.Request) -> web.Response:
    """Garbage collection now on one node (`{node}`) or every live node."""
    gw = request.app[GATEWAY_KEY]
    require_operator(await _principal(request), gw.config)
    reply = await call(_stub(request).CollectGarbage(scheduler_pb2.NodeGcRequest(
        node_id=request.match_info.get("node", "")), timeout=GC_TIMEOUT_SECONDS))
    return web.json_response({"nodes": [garbage_json(g) for g in reply.nodes]})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/snapshots", list_snapshots)
    r.add_get("/v1/snapshots/{name}", get_snapshot)
    r.add_post("/v1/functions/{name}/verify", verify_function)
    r.add_post("/v1/nodes/{node}/drain", drain_node)
    r.add_post("/v1/nodes/gc", collect_garbage)
    r.add_post("/v1/nodes/{node}/gc", collect_garbage)


_NAME_PARAM = {"name": "name", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}}
_SNAPSHOT = {"type": "object", "properties": {
    "function": {"type": "string"}, "name": {"type": "string"},
    "version": {"type": "string"}, "id": {"type": "string"}, "state": {"type": "string"},
    "stored_bytes": {"type": "integer"}, "raw_bytes": {"type": "integer"},
    "chunks": {"type": "integer"},
    "disk_nodes": {"type": "array", "items": {"type": "string"}},
    "pinned_nodes": {"type": "array", "items": {"type": "string"}}}}
_PASS_SUMMARY = {"type": "object", "properties": {
    "done": {"type": "boolean"}, "kind": {"type": "string"}, "ok": {"type": "boolean"},
    "nodes": {"type": "array", "items": {"type": "string"}},
    "bytes": {"type": "integer"}, "seconds": {"type": "number"},
    "bad": {"type": "array", "items": {"type": "object"}},
    "errors": {"type": "array", "items": {"type": "object"}}}}
_GARBAGE = {"type": "object", "properties": {"nodes": {"type": "array", "items": {
    "type": "object", "properties": {
        "node": {"type": "string"}, "freed_bytes": {"type": "integer"},
        "error": {"type": "string"},
        "freed": {"type": "array", "items": {"type": "object", "properties": {
            "kind": {"type": "string"}, "items": {"type": "integer"},
            "bytes": {"type": "integer"}}}}}}}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/v1/snapshots": {"get": {
        "summary": "Your functions' current snapshots: sizes, chunks, and which nodes "
                   "hold them on disk and in pinned memory.",
        "responses": {"200": _json({"type": "object", "properties": {
            "snapshots": {"type": "array", "items": _SNAPSHOT}}}, "The snapshots."),
            **_errors(401, 503)}}},
    "/v1/snapshots/{name}": {"get": {
        "summary": "One function's snapshot with a summary of its manifest (arenas, "
                   "chunks, compression, fingerprint, setup seconds).",
        "parameters": [_NAME_PARAM],
        "responses": {"200": _json(_SNAPSHOT, "The snapshot."),
                      **_errors(401, 404, 503)}}},
    "/v1/functions/{name}/verify": {"post": {
        "summary": "Re-read every chunk of the function's snapshot on each node holding "
                   "it and check its digest; `ok` is false if one is bad or missing.",
        "description": "With `Accept: application/x-ndjson`: progress lines (node, "
                       "done_bytes, total_bytes, ...), then the summary with done=true.",
        "parameters": [_NAME_PARAM, {"name": "node", "in": "query",
                                     "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The summary (or NDJSON progress).",
                              "content": {"application/json": {"schema": _PASS_SUMMARY},
                                          NDJSON: {"schema": {"type": "string"}}}},
                      **_errors(401, 403, 404, 503)}}},
    "/v1/nodes/{node}/drain": {"post": {
        "summary": "Drain a node (operator): cordon it, stop its idle instances, retire "
                   "busy ones when their calls end. Repeat until its instances are 0.",
        "parameters": [{"name": "node", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": _json({"type": "object", "properties": {
            "node": {"type": "object"}, "stopped": {"type": "integer"},
            "finishing": {"type": "integer"}}}, "The node, draining."),
            **_errors(401, 403, 404, 503)}}},
    "/v1/nodes/gc": {"post": {
        "summary": "Collect garbage on every live node now (operator): bundles and "
                   "snapshots no kept version uses, unpack folders, build leftovers, "
                   "old instance logs. Each node's bytes freed are also an event.",
        "responses": {"200": _json(_GARBAGE, "What each node freed."),
                      **_errors(401, 403, 503)}}},
    "/v1/nodes/{node}/gc": {"post": {
        "summary": "Collect garbage on one node now (operator).",
        "parameters": [{"name": "node", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": _json(_GARBAGE, "What the node freed."),
                      **_errors(401, 403, 404, 503)}}},
}
