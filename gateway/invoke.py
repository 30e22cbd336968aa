"""Function URLs: `POST /fn/{tenant}/{name}[/{path}]` (DESIGN.md §9).

The body reaches the handler as sent (JSON or raw bytes, up to the function's
`[limits] max_body`, capped by the gateway's max_body_bytes), except that a function
with typed inputs gets only calls that match them, with defaults filled in
(gateway/inputs.py; docs/function-api.md); the
answer comes back as the handler gave it: a complete body, or a stream (SSE with
`Accept: text/event-stream`, else NDJSON) relayed chunk by chunk as it is produced.
`X-Thaw-Timeout: <seconds>` is the client's own deadline: past it the answer is 504.

The route composes one path that only goes forward: the request read once at the edge
(gateway/request.py) → admission (gateway/admit.py) → one dispatch entry point
(`Dispatcher.open`, gateway/dispatch.py) → the response writer (gateway/relay.py).
A stored invocation (async, Idempotency-Key, webhook, or a sync call past its wait
limit) is handed to gateway/stored/, which runs it through the same path.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from thaw.core.errors import NotFound
from thaw.gateway.admit import admit, new_call
from thaw.gateway.files import carries_files, file_answer, form_body, resolve_inputs
from thaw.gateway.inputs import checked_body
from thaw.gateway.priority import call_knobs, function_knobs
from thaw.gateway.relay import done_within, relay
from thaw.gateway.request import call_headers, forwarded_path, parse_invoke, read_body
from thaw.gateway.state import FUNCTION_KEY, GATEWAY_KEY, START_KEY
from thaw.gateway.stored.submit import adopt_late, refuse_anonymous_webhook, submit


async def invoke(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    tenant, name = request.match_info["tenant"], request.match_info["name"]
    p = await admit(request, gw)
    if p.tenant != tenant:
        # Not 403: another tenant's function names are not disclosed.
        raise NotFound(f"function {tenant}/{name} not found", field="name")
    ask = parse_invoke(request)
    # Refused for anonymous callers whatever the call's kind (a streamed call never
    # reaches submit, which checks it too).
    refuse_anonymous_webhook(p, ask.webhook)
    # The function's own body limit (thaw.toml [limits] max_body), capped by the
    # gateway's.
    priority, limit, described = await call_knobs(request, gw, p, tenant, name)
    body = await read_body(request, limit, described)
    # Typed inputs are checked here, before any instance is touched (422 on a mismatch).
    knobs = await function_knobs(request, gw, tenant, name)
    if knobs.input_schema:  # a form's fields and files as typed inputs (gateway/files.py)
        body = await form_body(request, knobs.input_schema, body)
    body = await checked_body(knobs.input_schema, body)
    body = await resolve_inputs(request, p.tenant, knobs.input_schema, body, limit)
    call = new_call(request, tenant, name, forwarded_path(request), body,
                    call_headers(request), ask.timeout, priority)
    request[FUNCTION_KEY] = call.function
    if ask.stored:
        return await submit(request, gw, p, call, ask)
    # A plain call: relayed if its answer starts within the wait limit, else stored.
    wait = None if ask.streaming else ask.wait_limit(gw.config.sync_wait_seconds)
    opening = asyncio.ensure_future(gw.dispatcher.open(call))
    try:
        done = await done_within(opening, wait)
    except asyncio.CancelledError:
        opening.cancel()
        raise
    if not done:
        return await adopt_late(request, gw, p, call, opening)
    async with opening.result() as ex:
        request[START_KEY] = ex.start
        if carries_files(ex.content_type):  # paths returned: stored, answered as URLs
            return await file_answer(request, tenant, ex)
        return await relay(request, ex)
