"""The function URL's stored invocations: a call submitted async (`Prefer:
respond-async[, wait=N]`), with an Idempotency-Key or a webhook; and a plain sync call
that ran past its wait limit, adopted by the worker (the client gets 303 to its result).

The invocation path hands a call here; nothing here is called back by it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import uuid

from aiohttp import web

from thaw.core.errors import PermissionDenied
from thaw.gateway import tracing
from thaw.gateway.caller import may_read_invocation
from thaw.gateway.dispatch import Call, Exchange
from thaw.gateway.errors import IdempotencyKeyReused
from thaw.gateway.request import (
    IDEMPOTENCY_HEADER,
    INVOCATION_HEADER,
    WEBHOOK_HEADER,
    InvokeRequest,
)
from thaw.gateway.state import Gateway
from thaw.gateway.stored.outcome import finish_exchange, run
from thaw.gateway.stored.result_files import links_of
from thaw.gateway.stored.runner import RUNNER_KEY
from thaw.gateway.stored.targets import WebhookGuard
from thaw.gateway.stored.views import accepted, result_response, stored_answer
from thaw.proto import invocations_pb2, scheduler_pb2


def digest_of(call: Call) -> str:
    h = hashlib.sha256()
    for part in (call.name.encode(), call.path.encode(),
                 call.headers.get("Content-Type", "").encode(), call.body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def record_of(call: Call, p: scheduler_pb2.Principal, webhook: str, key: str
              ) -> invocations_pb2.Invocation:
    return invocations_pb2.Invocation(
        id=f"inv_{uuid.uuid4().hex}", tenant=call.tenant, function=call.name,
        priority=call.priority, path=call.path, body=call.body,
        content_type=call.headers.get("Content-Type", ""),
        headers_json=json.dumps(tracing.stored_headers(call.headers)),
        timeout_seconds=call.timeout or 0.0,
        webhook_url=webhook, idempotency_key=key, request_digest=digest_of(call),
        key_id=p.key_id)


def check_same_request(found: invocations_pb2.Invocation,
                       asked: invocations_pb2.Invocation,
                       p: scheduler_pb2.Principal) -> None:
    if found.key_id != p.key_id and not may_read_invocation(p, found):
        # Another key's invocation: neither its id nor its answer is this key's to see
        # (anonymous calls to a public function share the one empty key id).
        raise IdempotencyKeyReused(
            f"{IDEMPOTENCY_HEADER} {asked.idempotency_key!r} was already used by another "
            "API key of this tenant; use a new key", field=IDEMPOTENCY_HEADER)
    if found.request_digest != asked.request_digest:
        raise IdempotencyKeyReused(
            f"{IDEMPOTENCY_HEADER} {asked.idempotency_key!r} was used for a different "
            f"request (invocation {found.id}); use a new key for a new request",
            field=IDEMPOTENCY_HEADER)


def refuse_anonymous_webhook(p: scheduler_pb2.Principal, url: str) -> None:
    """A webhook is for callers with an API key: an anonymous caller of a public
    function would make the platform send requests wherever it liked (403)."""
    if url and not p.key_id:
        raise PermissionDenied(f"{WEBHOOK_HEADER} needs an API key: anonymous calls of a "
                               "public function cannot ask for a webhook",
                               field=WEBHOOK_HEADER)


async def check_webhook(p: scheduler_pb2.Principal, url: str, guard: WebhookGuard) -> None:
    """A webhook from a caller with an API key, to an address the deny list lets
    through (checked again at each delivery)."""
    refuse_anonymous_webhook(p, url)
    await guard.check(url)


async def submit(request: web.Request, gw: Gateway, p: scheduler_pb2.Principal,
                 call: Call, ask: InvokeRequest) -> web.StreamResponse:
    """Answer a function-URL call that is a stored invocation (`ask.stored`): 202 at
    once (async), or its answer if it ends within the wait limit, else 202 (async) or
    303 (sync) pointing to its result. A repeated Idempotency-Key gets the first
    request's invocation."""
    runner = request.app[RUNNER_KEY]
    if ask.webhook:
        await check_webhook(p, ask.webhook, runner.webhooks.guard)
    limit = ask.wait_limit(gw.config.sync_wait_seconds)
    late_status = 202 if ask.respond_async else 303
    record = record_of(call, p, ask.webhook, ask.idempotency_key)
    if ask.respond_async and ask.wait is None:
        inv, created = await runner.client.create(record)
        if not created:
            check_same_request(inv, record, p)
        runner.wake.set()
        return accepted(inv)
    inv, created = await runner.client.create(
        record, runner.id, gw.config.invocation_claim_seconds)
    if not created:
        check_same_request(inv, record, p)
        inv = await runner.wait_finished(call.tenant, inv.id, limit)
        if inv.state in ("queued", "running"):
            return accepted(inv, late_status)
        return stored_answer(await runner.client.get(call.tenant, inv.id, with_bodies=True),
                             links_of(request))
    with tracing.stored_run(call.tenant, call.name, tracing.stored_headers(call.headers)):
        outcome = runner.adopt(inv.id, run(gw, dataclasses.replace(call, request_id=inv.id)),
                               call.tenant)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit):
            await asyncio.shield(outcome)
    if not outcome.done():
        return accepted(inv, late_status)
    result = outcome.result()
    headers = {**dict(result.headers), INVOCATION_HEADER: inv.id}
    if result.start:
        headers["X-Thaw-Start"] = result.start
    return result_response(call.tenant, result.status, result.content_type, result.body,
                           headers, links_of(request))


async def adopt_late(request: web.Request, gw: Gateway, p: scheduler_pb2.Principal,
                     call: Call, opening: asyncio.Future[Exchange]) -> web.Response:
    """A plain sync call whose answer did not start within its wait limit: it becomes
    a stored invocation run to its end by the worker; the client gets 303 to its
    result."""
    runner = request.app[RUNNER_KEY]
    try:
        inv, _ = await runner.client.create(record_of(call, p, "", ""), runner.id,
                                            gw.config.invocation_claim_seconds)
    except BaseException:
        opening.cancel()
        raise
    runner.adopt(inv.id, asyncio.ensure_future(
        finish_exchange(opening, gw.config.max_body_bytes)), call.tenant)
    return accepted(inv, 303)
