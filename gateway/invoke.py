"""Function URLs: `/fn/{tenant}/{name}[/{path}]` (DESIGN.md §9), every method a
`__call__` handler may take (docs/function-api.md, "Full HTTP"): its method, sub-path,
query and headers (gateway/request.py:call_headers) reach the handler; a typed
(`predict()`) function takes POST only (405 for another method, before any instance
is touched).

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
from typing import Any

from aiohttp import web

from thaw.core.errors import NotFound
from thaw.gateway import cors, tracing
from thaw.gateway.admit import admit, new_call
from thaw.gateway.errors import error_body
from thaw.gateway.files import carries_files, file_answer, form_body, resolve_inputs
from thaw.gateway.inputs import checked_body
from thaw.gateway.openapi import _invoke_operation
from thaw.gateway.priority import call_knobs, forget_function, function_knobs
from thaw.gateway.relay import done_within, relay
from thaw.gateway.request import call_headers, forwarded_path, parse_invoke, read_body
from thaw.gateway.state import FUNCTION_KEY, GATEWAY_KEY, START_KEY
from thaw.gateway.stored.submit import adopt_late, refuse_anonymous_webhook, submit


@tracing.traced
async def invoke(request: web.Request) -> web.StreamResponse:
    """The route, inside the call's trace (gateway/tracing.py): every answer carries
    its `traceparent`, a streamed one from relay.py's head."""
    gw = request.app[GATEWAY_KEY]
    tenant, name = request.match_info["tenant"], request.match_info["name"]
    preflight = await cors.check(request, gw, tenant, name)  # before any key is asked
    if preflight is not None:
        return preflight
    p = await admit(request, gw)
    if p.tenant != tenant:
        # Not 403: another tenant's function names are not disclosed.
        raise NotFound(f"function {tenant}/{name} not found", field="name")
    tracing.admitted(tenant, name)
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
    if knobs.input_schema and request.method != "POST":
        return method_not_allowed(f"{tenant}/{name} takes typed inputs: call it with "
                                  f"POST and a JSON body, not {request.method}")
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
        if ex.start == "fresh" and not knobs.input_schema:
            # A function never built learns its schema at its first start.
            forget_function(request.app, tenant, name)
        if carries_files(ex.content_type):  # paths returned: stored, answered as URLs
            return await file_answer(request, tenant, ex)
        return await relay(request, ex)


def method_not_allowed(message: str) -> web.Response:
    """405, in the gateway's error shape, with the one method allowed."""
    return web.json_response(error_body("method_not_allowed", message, "method"),
                             status=405, headers={"Allow": "POST"})


# The methods a function URL takes besides POST (app.py's route) and HEAD (answered as
# GET would be, without the body; an OpenAPI document names no HEAD).
OTHER_METHODS = ("GET", "PUT", "PATCH", "DELETE", "OPTIONS")
_PATHS = ("/fn/{tenant}/{name}", "/fn/{tenant}/{name}/{path:.*}")
_BODILESS = ("get", "delete", "options")


def add_routes(app: web.Application) -> None:
    """Every method but POST on a function URL, registered after the routes other
    features serve under it (openapi.json, docs, predictions), which match first."""
    for path in _PATHS:
        for method in (*OTHER_METHODS, "HEAD"):
            app.router.add_route(method, path, invoke)


def _operation(method: str, with_path: bool) -> dict[str, Any]:
    operation = _invoke_operation(f"Call a function with {method.upper()} (a __call__ "
                                  "handler; a typed function answers 405)", with_path)
    if method in _BODILESS:
        operation.pop("requestBody", None)
    return operation


OPENAPI_PATHS: dict[str, Any] = {
    path: {m.lower(): _operation(m.lower(), with_path) for m in OTHER_METHODS}
    for path, with_path in (("/fn/{tenant}/{name}", False),
                            ("/fn/{tenant}/{name}/{path}", True))}
