"""cog and Replicate predictions (docs/cog.md).

`POST /fn/{tenant}/{name}/predictions` (cog's HTTP API) and `POST /v1/models/{tenant}/
{name}/predictions` (Replicate's model-scoped create) take `{"input": {...}}`: the input
object is the call's body, checked against the function's typed inputs (422) and sent
through the one invocation path (admission, `Dispatcher.open`, the answer read). The
answer is a prediction in cog's shape: id, status, input, output, error, logs, metrics,
times, urls.

A call to cog's route is sync unless it asks `Prefer: respond-async`; one to
Replicate's is async unless it asks `Prefer: wait[=N]`, as Replicate's API is. An
async call is a stored invocation
(gateway/stored/), created at once and read back in the same shape at
`GET /v1/predictions/{id}` and cancelled at `POST /v1/predictions/{id}/cancel`. A sync
call whose answer does not start within the wait limit becomes a stored invocation too
and answers `status: "starting"` with its id, to be polled. Errors answer Replicate's
problem form {"title", "detail", "status"} (422 adds "invalid_fields").
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from thaw.core.errors import InvalidArgument, NotFound, ThawError
from thaw.gateway import jsonbody, tracing
from thaw.gateway.admit import admit, new_call
from thaw.gateway.auth import require
from thaw.gateway.caller import check_invocation_reader, principal_of, reads_all_invocations
from thaw.gateway.errors import InputRejected, retry_after_header, status_of
from thaw.gateway.files import carries_files, publish, resolve_inputs
from thaw.gateway.inputs import checked_body
from thaw.gateway.prediction_stream import PREFIX as STREAM_PREFIX
from thaw.gateway.prediction_stream import LivePrediction, LiveStreams, serve
from thaw.gateway.priority import call_knobs, function_knobs
from thaw.gateway.relay import done_within
from thaw.gateway.request import parse_invoke, read_body
from thaw.gateway.state import CONFIG_KEY, ERROR_CODE_KEY, FUNCTION_KEY, GATEWAY_KEY, START_KEY
from thaw.gateway.stored.outcome import finish_exchange
from thaw.gateway.stored.result_files import is_refs, links_of
from thaw.gateway.stored.runner import RUNNER_KEY
from thaw.gateway.stored.submit import check_same_request, record_of
from thaw.gateway.stored.views import expired
from thaw.proto import invocations_pb2, scheduler_pb2

JSON = "application/json"
NDJSON = "application/x-ndjson"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What cog's and Replicate's clients send beside the input (a webhook is refused; the
# rest names the request and is not needed here).
BODY_KEYS = frozenset({"input", "id", "created_at", "output_file_prefix", "context",
                       "webhook", "webhook_events_filter", "webhook_completed", "stream",
                       "version"})
# Stored invocation states as cog/Replicate name a prediction's status.
STREAMS_KEY = web.AppKey("prediction_streams", LiveStreams)
STREAM_ASKED = web.RequestKey("prediction_stream", bool)
STATUS_OF_STATE = {"queued": "starting", "running": "processing", "succeeded": "succeeded",
                   "failed": "failed", "cancelled": "canceled"}


def problem(status: int, title: str, detail: str, field: str = "",
            headers: dict[str, str] | None = None) -> web.Response:
    """Replicate's error form (its client reads title, detail and status)."""
    body: dict[str, Any] = {"title": title, "detail": detail, "status": status}
    if field:
        body["field"] = field
    if status == 422:
        body["invalid_fields"] = [{"type": "invalid", "field": field or "input",
                                   "description": detail}]
    return web.json_response(body, status=status, headers=headers)


def prediction_errors(handler: Handler) -> Handler:
    """The route's ThawErrors answered in the problem form, with the gateway's status
    and Retry-After; the code still reaches the metrics and the access log."""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ThawError as exc:
            request[ERROR_CODE_KEY] = exc.code
            status = status_of(exc)
            retry_after = retry_after_header(exc, status)
            field = exc.field or ""
            if status == 422 and field and not field.startswith("input"):
                field = f"input.{field}"
            return problem(status, exc.code, exc.message, field,
                           {"Retry-After": retry_after} if retry_after else None)
    return wrapped


def _iso(seconds: float) -> str | None:
    if not seconds:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _base(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _decode_output(content_type: str, body: bytes) -> Any:
    """A function's answer as a prediction's output: JSON as its value, an NDJSON
    stream as the list of its items, text as a string, other bytes as text too."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == NDJSON:
        return [jsonbody.loads(line) for line in body.splitlines() if line.strip()]
    if kind == JSON:
        return jsonbody.loads(body) if body.strip() else None
    return body.decode("utf-8", "replace")


def prediction(base: str, pid: str, model: str, version: str, status: str,
               inputs: Any, output: Any = None, error: str | None = None,
               created: float = 0.0, started: float = 0.0, completed: float = 0.0
               ) -> dict[str, Any]:
    """One prediction in cog's (and Replicate's) shape."""
    url = f"{base}/v1/predictions/{pid}"
    metrics: dict[str, Any] = {}
    if started and completed:
        metrics["predict_time"] = round(completed - started, 6)
    return {"id": pid, "model": model, "version": version, "status": status,
            "input": inputs, "output": output, "error": error, "logs": "",
            "metrics": metrics, "created_at": _iso(created), "started_at": _iso(started),
            "completed_at": _iso(completed), "urls": {"get": url, "cancel": url + "/cancel"}}


def stored_prediction(base: str, inv: invocations_pb2.Invocation) -> dict[str, Any]:
    """A stored invocation as a prediction (its body is the prediction's input)."""
    try:
        inputs = jsonbody.loads(inv.body) if inv.body else {}
    except ValueError:
        inputs = {}
    status = STATUS_OF_STATE.get(inv.state, "failed")
    output: Any = None
    error: str | None = None
    if inv.state == "succeeded" and inv.result_status == 200:
        try:
            output = _decode_output(inv.result_content_type, inv.result_body)
        except ValueError as exc:
            status, error = "failed", f"the function's answer is not valid JSON: {exc}"
    elif inv.state in ("succeeded", "failed"):
        status = "failed"
        error = (inv.error_message if inv.error_code and not inv.result_body
                 else jsonbody.error_message(inv.result_status, inv.result_body))
    return prediction(base, inv.id, f"{inv.tenant}/{inv.function}", "", status, inputs,
                      output, error, inv.created_at, inv.started_at, inv.finished_at)


async def _read_input(request: web.Request, limit: int, described: str
                      ) -> tuple[dict[str, Any], bytes]:
    config = request.app[CONFIG_KEY]
    body = await read_body(request, limit, described)
    doc = jsonbody.parse_json(body, config.max_json_bytes, config.max_json_depth)
    if not isinstance(doc, dict) or not isinstance(doc.get("input", {}), dict):
        raise InvalidArgument('a prediction\'s body is {"input": {...}}: an object of the '
                              "predictor's inputs", field="input")
    for key in sorted(doc.keys() - BODY_KEYS):
        raise InvalidArgument(f"a prediction's body takes no {key!r}: its inputs go in "
                              '{"input": {...}}', field=key)
    if doc.get("webhook"):
        raise InvalidArgument("predictions take no webhook here; use the function URL "
                              "with X-Thaw-Webhook", field="webhook")
    if not isinstance(doc.get("stream", False), bool):
        raise InvalidArgument("a prediction's stream is true or false", field="stream")
    request[STREAM_ASKED] = doc.get("stream") is True
    inputs: dict[str, Any] = doc.get("input", {})
    return inputs, json.dumps(inputs, separators=(",", ":")).encode()


@tracing.traced
@prediction_errors
async def create_prediction(request: web.Request) -> web.StreamResponse:
    created = _now()
    gw = request.app[GATEWAY_KEY]
    tenant, name = request.match_info["tenant"], request.match_info["name"]
    p = await admit(request, gw)
    if p.tenant != tenant:
        raise NotFound(f"function {tenant}/{name} not found", field="name")
    tracing.admitted(tenant, name)
    ask = parse_invoke(request)
    if ask.webhook:
        raise InvalidArgument("predictions take no webhook here; use the function URL "
                              "with X-Thaw-Webhook", field="webhook")
    priority, limit, described = await call_knobs(request, gw, p, tenant, name)
    inputs, forwarded = await _read_input(request, limit, described)
    knobs = await function_knobs(request, gw, tenant, name)
    forwarded = await checked_body(knobs.input_schema, forwarded)
    inputs = jsonbody.loads(forwarded)  # with the defaults the check filled in
    # File inputs given as signed URLs travel as their bytes (gateway/files.py).
    forwarded = await resolve_inputs(request, tenant, knobs.input_schema, forwarded, limit)
    call = new_call(request, tenant, name, "", forwarded,
                    {"Content-Type": JSON, "Accept": JSON}, ask.timeout, priority)
    request[FUNCTION_KEY] = call.function
    created_status = 201 if request.path.startswith("/v1/") else 200
    base, model = _base(request), f"{tenant}/{name}"
    runner = request.app[RUNNER_KEY]
    if request.get(STREAM_ASKED):  # runs now; its events at urls.stream
        live = request.app[STREAMS_KEY].start(gw.dispatcher, call, model, inputs,
                                              gw.config.max_body_bytes)
        return web.json_response(live_body(base, live),
                                 status=201 if created_status == 201 else 202)
    if ask.respond_async or (created_status == 201 and not _asks_wait(request)):
        record = record_of(call, p, "", ask.idempotency_key)
        inv, made = await runner.client.create(record)
        if not made:
            check_same_request(inv, record, p)
        runner.wake.set()
        return web.json_response(await with_files(request, inv), status=202)
    opening = asyncio.ensure_future(gw.dispatcher.open(call))
    try:
        done = await done_within(opening, ask.wait_limit(gw.config.sync_wait_seconds))
    except asyncio.CancelledError:
        opening.cancel()
        raise
    if not done:  # finished by the worker as a stored invocation: poll it
        try:
            inv, _ = await runner.client.create(record_of(call, p, "", ""), runner.id,
                                                gw.config.invocation_claim_seconds)
        except BaseException:
            opening.cancel()
            raise
        runner.adopt(inv.id, asyncio.ensure_future(
            finish_exchange(opening, gw.config.max_body_bytes)), tenant)
        body = stored_prediction(base, inv)
        body["status"] = "starting"  # Replicate's client polls a "starting" one
        return web.json_response(body, status=202)
    started = _now()
    async with opening.result() as ex:
        request[START_KEY] = ex.start
        answer = await ex.read()
        status = ex.status
        content_type = ex.upstream.headers.get("Content-Type", JSON)
        version = str(ex.lease.version or "")
    completed = _now()
    pid = f"sync_{uuid.uuid4().hex}"
    if status == 422:  # the handler refused the inputs itself (thaw.InvalidInput)
        raise_rejected(answer)
    if status != 200:
        body = prediction(base, pid, model, version, "failed", inputs, None,
                          jsonbody.error_message(status, answer), created, started, completed)
        return web.json_response(body, status=created_status)
    try:
        output = (await publish(request, tenant, answer) if carries_files(content_type)
                  else _decode_output(content_type, answer))
        body = prediction(base, pid, model, version, "succeeded", inputs, output, None,
                          created, started, completed)
    except ValueError as exc:
        body = prediction(base, pid, model, version, "failed", inputs, None,
                          f"the function's answer is not valid JSON: {exc}", created,
                          started, completed)
    return web.json_response(body, status=created_status)


async def with_files(request: web.Request, inv: invocations_pb2.Invocation
                     ) -> dict[str, Any]:
    """A stored prediction; output files, as a sync one's, by signed URLs minted
    now from the files kept with the result (gateway/stored/result_files.py)."""
    body = stored_prediction(_base(request), inv)
    if body["status"] != "succeeded":
        return body
    links = links_of(request)
    if links is not None and is_refs(inv.result_content_type):
        body["output"] = links.value(inv.tenant, inv.result_body)
    elif carries_files(inv.result_content_type):  # stored before its files were kept
        body["output"] = await publish(request, inv.tenant, inv.result_body)
    return body


def _asks_wait(request: web.Request) -> bool:
    """`Prefer: wait` or `wait=N`: Replicate's create is async without it."""
    for value in request.headers.getall("Prefer", ()):
        for pref in value.split(","):
            token = pref.split(";")[0].split("=")[0].strip().lower()
            if token == "wait":
                return True
    return False


def raise_rejected(answer: bytes) -> None:
    """A handler's own 422 as the route's 422 (its field named under input)."""
    field = ""
    try:
        error = jsonbody.loads(answer)["error"]
        field = str(error.get("field") or "") if isinstance(error, dict) else ""
    except (ValueError, KeyError, TypeError):
        pass
    raise InputRejected(jsonbody.error_message(422, answer), field=field or "input")


def _now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


async def _reader(request: web.Request) -> scheduler_pb2.Principal:
    p = await principal_of(request)
    if not reads_all_invocations(p):
        require(p, "invoke")
    return p


def _id(request: web.Request) -> str:
    pid = request.match_info["id"]
    if not pid.startswith("inv_") or len(pid) > 64:
        raise NotFound(f"prediction {pid[:80]} not found (a sync prediction that "
                       "finished within its call is not stored)", field="id")
    return pid


def live_body(base: str, live: LivePrediction) -> dict[str, Any]:
    """A streaming prediction: its items so far as output, and where to stream it."""
    body = prediction(base, live.id, live.model, live.version, live.status, live.inputs,
                      list(live.items), live.error, live.created, live.started,
                      live.completed)
    body["urls"]["stream"] = f"{base}/v1/predictions/{live.id}/stream"
    return body


@prediction_errors
async def stream_prediction(request: web.Request) -> web.StreamResponse:
    """A streaming prediction's server-sent events (gateway/prediction_stream.py)."""
    p = await _reader(request)
    return await serve(request, request.app[STREAMS_KEY].get(p.tenant,
                                                             request.match_info["id"]))


@prediction_errors
async def get_prediction(request: web.Request) -> web.StreamResponse:
    p = await _reader(request)
    if request.match_info["id"].startswith(STREAM_PREFIX):
        live = request.app[STREAMS_KEY].get(p.tenant, request.match_info["id"])
        return web.json_response(live_body(_base(request), live))
    inv = await request.app[RUNNER_KEY].client.get(p.tenant, _id(request), with_bodies=True)
    check_invocation_reader(p, inv)
    if inv.state == "expired":
        raise expired(inv.id)
    return web.json_response(await with_files(request, inv))


@prediction_errors
async def cancel_prediction(request: web.Request) -> web.StreamResponse:
    """Cancels a queued or running prediction; a finished one is answered as it is."""
    p = await _reader(request)
    if request.match_info["id"].startswith(STREAM_PREFIX):
        streams = request.app[STREAMS_KEY]
        live = streams.get(p.tenant, request.match_info["id"])
        streams.cancel(live)
        if live.task is not None:
            await asyncio.wait({live.task})
        return web.json_response(live_body(_base(request), live))
    gw, runner = request.app[GATEWAY_KEY], request.app[RUNNER_KEY]
    before = await runner.client.get(p.tenant, _id(request))
    check_invocation_reader(p, before)
    if before.state == "expired":
        raise expired(before.id)
    if before.state in ("queued", "running"):
        await runner.client.cancel(p.tenant, before.id, gw.config.result_ttl_seconds)
        runner.cancel_local(before.id)
    inv = await runner.client.get(p.tenant, before.id, with_bodies=True)
    return web.json_response(await with_files(request, inv))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/fn/{tenant}/{name}/predictions", create_prediction)
    r.add_post("/v1/models/{tenant}/{name}/predictions", create_prediction)
    r.add_get("/v1/predictions/{id}", get_prediction)
    r.add_post("/v1/predictions/{id}/cancel", cancel_prediction)
    r.add_get("/v1/predictions/{id}/stream", stream_prediction)
    streams = app[STREAMS_KEY] = LiveStreams()

    async def stop_streams(_app: web.Application) -> None:
        await streams.close()

    app.on_cleanup.append(stop_streams)


# ---- OpenAPI ------------------------------------------------------------------------

PROBLEM = {"type": "object", "required": ["title", "detail", "status"], "properties": {
    "title": {"type": "string", "description": "The error's code."},
    "detail": {"type": "string", "description": "What is wrong, and what to do."},
    "status": {"type": "integer"}, "field": {"type": "string"},
    "invalid_fields": {"type": "array", "items": {"type": "object"}}}}
PREDICTION = {"type": "object", "required": [
    "id", "status", "input", "output", "error", "logs", "metrics", "created_at", "urls"],
    "properties": {
        "id": {"type": "string"}, "model": {"type": "string"},
        "version": {"type": "string"},
        "status": {"type": "string", "enum": ["starting", "processing", "succeeded",
                                              "failed", "canceled"]},
        "input": {"type": "object"}, "output": {}, "error": {"type": ["string", "null"]},
        "logs": {"type": "string"}, "metrics": {"type": "object", "properties": {
            "predict_time": {"type": "number"}}},
        "created_at": {"type": ["string", "null"]},
        "started_at": {"type": ["string", "null"]},
        "completed_at": {"type": ["string", "null"]},
        "urls": {"type": "object", "properties": {"get": {"type": "string"},
                                                  "cancel": {"type": "string"},
                                                  "stream": {"type": "string"}}}}}


# The gateway's JSON-body checks run before the route and answer its own form.
ERROR = {"anyOf": [PROBLEM, {"type": "object", "required": ["error"], "description":
                             "The gateway's form {\"error\": {\"code\", \"message\", "
                             "\"field\"}} of a body refused before the route."}]}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ERROR}}}


def _answer(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": PREDICTION}}}


KEYED = {"401": _error("No API key, or an unknown one."),
         "403": _error("The API key lacks the invoke scope.")}
PARAMS = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
          for n in ("tenant", "name")]
ID_PARAM = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "A stored prediction's id (inv_...)."}]
CREATE = {
    "summary": "Run a prediction: {\"input\": {...}} answered in cog's shape",
    "description": "cog's route is sync by default, Replicate's only with `Prefer: "
                   "wait[=N]`; an async one is stored and answered 202 at once (poll "
                   "GET /v1/predictions/{id}). See docs/cog.md.",
    "tags": ["predictions"], "parameters": PARAMS,
    "requestBody": {"required": True, "content": {JSON: {"schema": {
        "type": "object", "properties": {"input": {"type": "object"},
                                         "stream": {"type": "boolean"}}}}}},
    "responses": {
        "200": _answer("The prediction, finished (succeeded or failed)."),
        "201": _answer("The prediction, finished (Replicate's route)."),
        "202": _answer("Stored: respond-async, or past the wait limit (poll it)."),
        "400": _error("The body is not {\"input\": {...}}, or a malformed header."),
        "404": _error("No such function for this key's tenant."),
        "408": _error("The body paused longer than body_timeout_seconds."),
        "413": _error("The body is too large."),
        "422": _error("The input does not fit the predictor's typed inputs (the field "
                      "is named), or the predictor refused it."),
        "429": _error("Rate limited."),
        "503": _error("The function cannot run now (no capacity, circuit open, build "
                      "failed)."),
        "504": _error("A deadline passed."),
        **KEYED}}
READ_ERRORS = {"404": _error("No such stored prediction for this key."),
               "410": _error("The prediction has expired."), **KEYED}
OPENAPI_PATHS: dict[str, Any] = {
    "/fn/{tenant}/{name}/predictions": {"post": CREATE},
    "/v1/models/{tenant}/{name}/predictions": {"post": {
        **CREATE, "summary": "Replicate: create a prediction of a model (a function)"}},
    "/v1/predictions/{id}": {"get": {
        "summary": "A stored prediction in cog's shape", "tags": ["predictions"],
        "parameters": ID_PARAM,
        "responses": {"200": _answer("The prediction."), **READ_ERRORS}}},
    "/v1/predictions/{id}/cancel": {"post": {
        "summary": "Cancel a stored prediction (a finished one is answered as it is)",
        "tags": ["predictions"], "parameters": ID_PARAM,
        "responses": {"200": _answer("The prediction, canceled or finished."),
                      **READ_ERRORS}}},
    "/v1/predictions/{id}/stream": {"get": {
        "summary": "A streaming prediction's output as server-sent events",
        "description": "For a prediction created with \"stream\": true (an id "
                       "stream_..., its urls.stream): `output` events, then `error` "
                       "where it failed, then `done`. See docs/cog.md.",
        "tags": ["predictions"], "parameters": ID_PARAM,
        "responses": {"200": {"description": "The events, as the prediction runs.",
                              "content": {"text/event-stream": {
                                  "schema": {"type": "string"}}}},
                      "404": _error("No such streaming prediction on this gateway "
                                    "for this key."), **KEYED}}},
}
