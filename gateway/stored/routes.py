"""The stored invocations' routes: `GET /v1/invocations[/{id}[/result]]`,
`POST /v1/invocations/{id}/cancel`; the worker's lifecycle; their OpenAPI paths."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from thaw.core.errors import InvalidArgument, NotFound
from thaw.gateway.auth import require
from thaw.gateway.caller import (
    check_invocation_reader,
    invocations_key_filter,
    principal_of,
    reads_all_invocations,
)
from thaw.gateway.errors import InvocationFinished
from thaw.gateway.files import FILES_KEY
from thaw.gateway.request import prefer_wait
from thaw.gateway.state import GATEWAY_KEY
from thaw.gateway.stored.client import InvocationsClient
from thaw.gateway.stored.result_files import app_links, links_of
from thaw.gateway.stored.runner import RUNNER_KEY, InvocationRunner
from thaw.gateway.stored.signing_routes import OPENAPI_PATHS as SIGNING_PATHS
from thaw.gateway.stored.signing_routes import add_signing_routes
from thaw.gateway.stored.views import accepted, expired, invocation_json, stored_answer
from thaw.gateway.stored.webhooks import delivery_session
from thaw.proto import scheduler_pb2


async def _principal(request: web.Request) -> scheduler_pb2.Principal:
    p = await principal_of(request)
    if not reads_all_invocations(p):  # deploy and admin keys read all of the tenant's
        require(p, "invoke")
    return p


def _id(request: web.Request) -> str:
    invocation_id = request.match_info["id"]
    if not invocation_id.startswith("inv_") or len(invocation_id) > 64:
        raise NotFound(f"invocation {invocation_id[:80]} not found", field="id")
    return invocation_id


async def get_invocation(request: web.Request) -> web.Response:
    p = await _principal(request)
    inv = await request.app[RUNNER_KEY].client.get(p.tenant, _id(request), with_bodies=True)
    check_invocation_reader(p, inv)
    if inv.state == "expired":
        raise expired(inv.id)
    return web.json_response(invocation_json(inv, links_of(request)))


async def get_result(request: web.Request) -> web.Response:
    p = await _principal(request)
    gw, runner = request.app[GATEWAY_KEY], request.app[RUNNER_KEY]
    wait = prefer_wait(request)
    limit = gw.config.sync_wait_seconds if wait is None else min(
        wait, gw.config.sync_wait_seconds)
    if not reads_all_invocations(p):  # before any wait: no timing says it exists
        check_invocation_reader(p, await runner.client.get(p.tenant, _id(request)))
    inv = await runner.wait_finished(p.tenant, _id(request), limit)
    if inv.state in ("queued", "running"):
        # Still running: come back (a client following redirects waits again).
        return accepted(inv, 303)
    return stored_answer(await runner.client.get(p.tenant, inv.id, with_bodies=True),
                         links_of(request))


async def cancel_invocation(request: web.Request) -> web.Response:
    p = await _principal(request)
    gw, runner = request.app[GATEWAY_KEY], request.app[RUNNER_KEY]
    before = await runner.client.get(p.tenant, _id(request))
    check_invocation_reader(p, before)
    if before.state == "expired":
        raise expired(before.id)
    inv = await runner.client.cancel(p.tenant, before.id, gw.config.result_ttl_seconds)
    if inv.state != "cancelled":
        raise InvocationFinished(f"invocation {inv.id} already {inv.state}; it cannot be "
                                 "cancelled", field="id")
    # Cut it now if it runs here; another replica cuts it when it renews its claim.
    runner.cancel_local(inv.id)
    return web.json_response(invocation_json(inv))


MAX_LIST = 1000


async def list_invocations(request: web.Request) -> web.Response:
    p = await _principal(request)
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise InvalidArgument("limit must be an integer", field="limit") from None
    if not 1 <= limit <= MAX_LIST:
        raise InvalidArgument(f"limit must be in [1, {MAX_LIST}]", field="limit")
    found = await request.app[RUNNER_KEY].client.list_recent(
        p.tenant, limit, request.query.get("status", ""), request.query.get("function", ""),
        invocations_key_filter(p), request.query.get("source", ""))
    return web.json_response({"invocations": [invocation_json(i) for i in found]})


# ---- lifecycle ------------------------------------------------------------------------

async def _worker(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY_KEY]
    session = delivery_session()
    # The file store is made by a later feature's startup: read when first needed.
    runner = InvocationRunner(gw, InvocationsClient(gw.scheduler.channel), session,
                              files=lambda: app.get(FILES_KEY),
                              links=lambda: app_links(app))
    app[RUNNER_KEY] = runner
    loops = [asyncio.get_running_loop().create_task(coro) for coro in (
        runner.claim_forever(), runner.renew_forever(), runner.sweep_forever(),
        runner.webhooks_forever())]
    yield
    for task in loops:
        task.cancel()
    for task in loops:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await runner.close()
    await session.close()


def add_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(_worker)
    app.router.add_get("/v1/invocations", list_invocations)
    app.router.add_get("/v1/invocations/{id}", get_invocation)
    app.router.add_get("/v1/invocations/{id}/result", get_result)
    app.router.add_post("/v1/invocations/{id}/cancel", cancel_invocation)
    add_signing_routes(app)


# ---- OpenAPI --------------------------------------------------------------------------

def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}


ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
PREFER_PARAM = {"name": "Prefer", "in": "header", "required": False,
                "description": "`wait=N`: wait at most N seconds (capped by the gateway's "
                               "sync_wait_seconds).", "schema": {"type": "string"}}
INVOCATION_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "id": {"type": "string"}, "function": {"type": "string"},
    "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed",
                                          "cancelled", "expired"]},
    "url": {"type": "string"}, "result_url": {"type": "string"},
    "source": {"type": "string", "enum": ["call", "schedule"]},
    "schedule_id": {"type": ["string", "null"]},
    "trace_id": {"type": ["string", "null"],
                 "description": "The trace the call began (docs/tracing.md)."},
    "result": {}, "result_base64": {"type": "string"},
    "result_status": {"type": "integer"}, "error": {"type": "object"}}}
COMMON_ERRORS = {"401": _error("No API key, or an unknown one."),
                 "403": _error("The API key has none of the invoke, deploy and admin "
                               "scopes."),
                 "404": _error("No such invocation for this key's tenant (an invoke-only "
                               "key sees only the invocations it made).")}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/invocations": {"get": {
        "summary": "The tenant's recent invocations (stored ones: async, past the wait "
                   "limit, or with an Idempotency-Key), newest first; an invoke-only "
                   "key's own only.",
        "parameters": [
            {"name": "limit", "in": "query", "schema": {
                "type": "integer", "minimum": 1, "maximum": MAX_LIST, "default": 100}},
            {"name": "status", "in": "query", "schema": {"type": "string", "enum": [
                "queued", "running", "succeeded", "failed", "cancelled", "expired"]}},
            {"name": "function", "in": "query", "schema": {"type": "string"}},
            {"name": "source", "in": "query", "description": "Only a client's calls or "
             "only a cron schedule's runs (docs/schedules.md).",
             "schema": {"type": "string", "enum": ["call", "schedule"]}}],
        "responses": {
            "200": {"description": "Invocations, without their results.",
                    "content": {"application/json": {"schema": {
                        "type": "object", "properties": {"invocations": {
                            "type": "array", "items": INVOCATION_SCHEMA}}}}}},
            "400": _error("A bad limit, status or source."),
            "401": COMMON_ERRORS["401"], "403": COMMON_ERRORS["403"]}}},
    "/v1/invocations/{id}": {"get": {
        "summary": "An invocation's status, timings and result (JSON inline, other "
                   "content as result_base64; large ones only through result_url).",
        "parameters": [ID_PARAM],
        "responses": {
            "200": {"description": "The invocation.", "content": {"application/json": {
                "schema": INVOCATION_SCHEMA}}},
            **COMMON_ERRORS,
            "410": _error("The invocation expired (result_ttl_seconds).")}}},
    "/v1/invocations/{id}/result": {"get": {
        "summary": "The invocation's result as the function answered it (status, "
                   "content type, body); waits for it up to the sync wait limit.",
        "parameters": [ID_PARAM, PREFER_PARAM],
        "responses": {
            "200": {"description": "The function's answer (any status it gave).",
                    "content": {"*/*": {"schema": {}}}},
            "303": {"description": "Still running: see this URL again.",
                    "headers": {"Location": {"schema": {"type": "string"}}}},
            **COMMON_ERRORS,
            "409": _error("The invocation was cancelled."),
            "410": _error("The invocation expired (result_ttl_seconds).")}}},
    "/v1/invocations/{id}/cancel": {"post": {
        "summary": "Cancel an invocation: a queued one at once, a running one is cut.",
        "parameters": [ID_PARAM],
        "responses": {
            "200": {"description": "The cancelled invocation.",
                    "content": {"application/json": {"schema": INVOCATION_SCHEMA}}},
            **COMMON_ERRORS,
            "409": _error("The invocation already finished."),
            "410": _error("The invocation expired (result_ttl_seconds).")}}},
    **SIGNING_PATHS,
}
