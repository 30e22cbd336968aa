"""Open Inference Protocol v2 routes (KServe, Triton; docs/open-inference.md).

`{name}` in /v2/models/{name} is a function of the caller's tenant (the key's), as
the OpenAI routes' `model` is. An inference request is checked here (gateway/
oip_tensors.py), its tensors handed to the handler as one JSON body through the one
invocation path (admission, `Dispatcher.open`, the answer read), and the handler's
answer turned into v2 outputs. Errors answer in the protocol's form,
{"error": "<message>"}, with the gateway's status for each (400, 401, 403, 404, ...).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any

from aiohttp import web

from thaw.core.errors import NotFound, ThawError
from thaw.core.spec import NAME_PATTERN
from thaw.gateway import jsonbody, tracing
from thaw.gateway.admit import admit, new_call
from thaw.gateway.errors import BadFunctionAnswer, retry_after_header, status_of
from thaw.gateway.inputs import checked_body
from thaw.gateway.oip_binary import HEADER, OCTETS, attach_inputs, binary_answer, split_body
from thaw.gateway.oip_tensors import InferRequest, outputs_of, parse_infer
from thaw.gateway.priority import call_priority, check_body_size, function_knobs
from thaw.gateway.relay import answer_headers
from thaw.gateway.request import TIMEOUT_HEADER, client_timeout, read_body
from thaw.gateway.state import (
    CONFIG_KEY,
    ERROR_CODE_KEY,
    FUNCTION_KEY,
    GATEWAY_KEY,
    START_KEY,
)
from thaw.proto import scheduler_pb2

PLATFORM = "thaw"
JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def v2_error(status: int, message: str, headers: dict[str, str] | None = None
             ) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def v2_errors(handler: Handler) -> Handler:
    """The route's ThawErrors answered as v2 errors, with the gateway's status and
    Retry-After; the code still reaches the metrics and the access log."""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ThawError as exc:
            request[ERROR_CODE_KEY] = exc.code
            status = status_of(exc)
            retry_after = retry_after_header(exc, status)
            return v2_error(status, exc.message,
                            {"Retry-After": retry_after} if retry_after else None)
    return wrapped


def _model_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not NAME_PATTERN.match(name):
        raise NotFound(f"model {name!r} not found", field="name")
    return name


def _check_version(request: web.Request, fn: scheduler_pb2.FunctionInfo) -> None:
    """A versioned route names the active version (the one that serves): any other
    is 404, as an earlier version serves only after a rollback."""
    version = request.match_info.get("version")
    if version is not None and version != fn.version:
        serving = f"version {fn.version} serves" if fn.version else "no version serves"
        raise NotFound(f"model {fn.name!r} version {version!r} is not served ({serving})",
                       field="version")


async def _function(request: web.Request) -> scheduler_pb2.FunctionInfo:
    """The caller's tenant's function named in the path (404 for another tenant's)."""
    gw = request.app[GATEWAY_KEY]
    p = await admit(request, gw)
    name = _model_name(request)
    fn = await gw.scheduler.get_function(p.tenant, name)
    if fn.state == "deleted":
        raise NotFound(f"model {name!r} not found", field="name")
    _check_version(request, fn)
    return fn


# ---- health and metadata ------------------------------------------------------------

async def server_metadata(request: web.Request) -> web.Response:
    try:
        version = metadata.version("thaw")
    except metadata.PackageNotFoundError:
        version = "0"
    return web.json_response({"name": PLATFORM, "version": version, "extensions": []})


async def health_live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def health_ready(request: web.Request) -> web.Response:
    # The protocol answers "not ready" with a 4xx status.
    if await request.app[GATEWAY_KEY].scheduler.ready():
        return web.json_response({"ready": True})
    return v2_error(400, "the gateway is not ready: the scheduler is not reachable")


@v2_errors
async def model_metadata(request: web.Request) -> web.StreamResponse:
    fn = await _function(request)
    return web.json_response({
        "name": fn.name, "versions": [fn.version] if fn.version else [],
        "platform": PLATFORM, "inputs": [], "outputs": []})


@v2_errors
async def model_ready(request: web.Request) -> web.StreamResponse:
    fn = await _function(request)
    if fn.state != "ready":
        detail = f": {fn.reason}" if fn.reason else ""
        return v2_error(400, f"model {fn.name!r} is {fn.state}, not ready{detail}")
    return web.json_response({"name": fn.name, "ready": True})


# ---- inference ----------------------------------------------------------------------

async def _read_request(request: web.Request) -> tuple[bytes, InferRequest]:
    gw = request.app[GATEWAY_KEY]
    config = request.app[CONFIG_KEY]
    body = await read_body(request, gw.config.max_body_bytes)
    # The JSON header, and any binary tensor data after it (gateway/oip_binary.py); a
    # body without the header is all JSON, bounded as every JSON route's is.
    header = request.headers.get(HEADER)
    text, binary = split_body(body, header, config.max_json_bytes)
    doc = jsonbody.parse_json(text, config.max_json_bytes, config.max_json_depth)
    if header is not None:
        attach_inputs(doc, binary)
    infer = parse_infer(doc)
    return json.dumps(infer.handler_body(), separators=(",", ":")).encode(), infer


@tracing.traced
@v2_errors
async def infer(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    p = await admit(request, gw)
    name = _model_name(request)
    if "version" in request.match_info:
        _check_version(request, await gw.scheduler.get_function(p.tenant, name))
    timeout = client_timeout(request.headers.get(TIMEOUT_HEADER))
    forwarded, infer_request = await _read_request(request)
    await check_body_size(request, gw, p.tenant, name, len(forwarded))
    # A typed handler's schema applies to the body it gets (422 naming the field).
    knobs = await function_knobs(request, gw, p.tenant, name)
    forwarded = await checked_body(knobs.input_schema, forwarded)
    priority = await call_priority(request, gw, p, p.tenant, name)
    tracing.admitted(p.tenant, name)
    call = new_call(request, p.tenant, name, f"/v2/models/{name}/infer", forwarded,
                    {"Content-Type": JSON, "Accept": JSON}, timeout, priority)
    request[FUNCTION_KEY] = call.function
    async with await gw.dispatcher.open(call) as ex:
        request[START_KEY] = ex.start
        answer = await ex.read()
        headers = answer_headers(ex, buffered=True)
        status = ex.status
    headers.pop("Content-Type", None)
    if status != 200:  # counted by its status, as a function URL's answer is
        return v2_error(status, jsonbody.error_message(status, answer), headers)
    try:
        result = jsonbody.loads(answer)
    except ValueError as exc:
        raise BadFunctionAnswer(f"function {name} did not answer with JSON "
                                f"(v2 outputs are made from a JSON answer): {exc}") from exc
    outputs = outputs_of(result, infer_request.outputs)
    version = headers.get("X-Thaw-Version", "")
    body: dict[str, Any] = {"model_name": name, "model_version": version,
                            "outputs": [t.json() for t in outputs]}
    if infer_request.id is not None:
        body["id"] = infer_request.id
    packed = binary_answer(body, outputs, infer_request.binary_outputs(outputs))
    if packed is not None:
        data, header_length = packed
        headers[HEADER] = str(header_length)
        return web.Response(body=data, headers={**headers, "Content-Type": OCTETS})
    return web.json_response(body, headers=headers)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/health/live", health_live)
    r.add_get("/v2/health/ready", health_ready)
    r.add_get("/v2/models/{name}", model_metadata)
    r.add_get("/v2/models/{name}/ready", model_ready)
    r.add_post("/v2/models/{name}/infer", infer)
    r.add_get("/v2/models/{name}/versions/{version}", model_metadata)
    r.add_get("/v2/models/{name}/versions/{version}/ready", model_ready)
    r.add_post("/v2/models/{name}/versions/{version}/infer", infer)


# ---- OpenAPI ------------------------------------------------------------------------

V2_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "description": "The protocol's error: a message naming the part at fault. The "
                   "gateway's JSON-body checks, which run before the route, answer "
                   "the gateway's form {\"code\", \"message\", \"field\"} instead.",
    "anyOf": [{"type": "string"}, {"type": "object"}]}}}
NAME_PARAM = {"name": "name", "in": "path", "required": True,
              "description": "A function of the API key's tenant.",
              "schema": {"type": "string"}}
TENSOR = {"type": "object", "required": ["name", "shape", "datatype", "data"],
          "properties": {
              "name": {"type": "string", "minLength": 1, "maxLength": 256},
              "shape": {"type": "array", "maxItems": 32,
                        "items": {"type": "integer", "minimum": 0}},
              "datatype": {"type": "string", "enum": [
                  "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                  "INT32", "INT64", "FP16", "FP32", "FP64", "BF16", "BYTES"]},
              "parameters": {"type": "object"},
              "data": {"description": "Row-major elements, flat or nested to the "
                                      "shape."}}}
BINARY_BODY = {
    "schema": {"type": "string", "format": "binary"},
    "description": "The binary tensor data extension: a JSON header of "
                   "Inference-Header-Content-Length bytes, then the data of the inputs "
                   "(outputs) with parameters.binary_data_size, in order "
                   "(docs/open-inference.md)."}
VERSION_PARAM = {"name": "version", "in": "path", "required": True,
                 "description": "The function's active version (any other: 404).",
                 "schema": {"type": "string"}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": V2_ERROR}}}


def _retry(description: str) -> dict[str, Any]:
    return {**_error(description), "headers": {"Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 1}}}}


KEYED_ERRORS = {
    "401": _error("No API key, or an unknown one."),
    "403": _error("The API key lacks the invoke scope."),
    "404": _error("No such function for this key's tenant."),
    "429": _retry("Rate limited (the key's rate, or the function's queue is full)."),
}
OPENAPI_PATHS: dict[str, Any] = {
    "/v2": {"get": {
        "summary": "Open Inference v2: server metadata", "tags": ["open-inference"],
        "security": [],
        "responses": {"200": {"description": "The server's name and version.",
                              "content": {JSON: {"schema": {
                                  "type": "object",
                                  "required": ["name", "version", "extensions"]}}}}}}},
    "/v2/health/live": {"get": {
        "summary": "Open Inference v2: the gateway is live", "tags": ["open-inference"],
        "security": [],
        "responses": {"200": {"description": "Live.", "content": {JSON: {
            "schema": {"type": "object", "properties": {"live": {"type": "boolean"}}}}}}}}},
    "/v2/health/ready": {"get": {
        "summary": "Open Inference v2: the gateway is ready (its scheduler answers)",
        "tags": ["open-inference"], "security": [],
        "responses": {
            "200": {"description": "Ready.", "content": {JSON: {"schema": {
                "type": "object", "properties": {"ready": {"type": "boolean"}}}}}},
            "400": _error("Not ready (the protocol's 4xx): the scheduler is not "
                          "reachable.")}}},
    "/v2/models/{name}": {"get": {
        "summary": "Open Inference v2: a function's model metadata",
        "tags": ["open-inference"], "parameters": [NAME_PARAM],
        "responses": {
            "200": {"description": "Name, versions, platform, inputs and outputs "
                                   "(empty where the function declares none).",
                    "content": {JSON: {"schema": {
                        "type": "object",
                        "required": ["name", "versions", "platform", "inputs",
                                     "outputs"]}}}},
            **KEYED_ERRORS}}},
    "/v2/models/{name}/ready": {"get": {
        "summary": "Open Inference v2: whether a function is ready to serve",
        "tags": ["open-inference"], "parameters": [NAME_PARAM],
        "responses": {
            "200": {"description": "Ready (built; a cold start serves it).",
                    "content": {JSON: {"schema": {"type": "object"}}}},
            "400": _error("Not ready: building or failed (the message says which)."),
            **KEYED_ERRORS}}},
    "/v2/models/{name}/infer": {"post": {
        "summary": "Open Inference v2: run a function on tensors",
        "description": "The inputs reach the handler as one JSON body {\"inputs\": "
                       "{name: data nested to its shape}, \"parameters\"?}; its answer "
                       "(name -> value) becomes the outputs. See "
                       "docs/open-inference.md.",
        "tags": ["open-inference"], "parameters": [NAME_PARAM],
        "requestBody": {"required": True, "content": {JSON: {"schema": {
            "type": "object", "required": ["inputs"], "properties": {
                "id": {"type": "string"}, "parameters": {"type": "object"},
                "inputs": {"type": "array", "minItems": 1, "maxItems": 256,
                           "items": TENSOR},
                "outputs": {"type": "array", "items": {
                    "type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string"},
                                   "parameters": {"type": "object"}}}}}}},
            OCTETS: BINARY_BODY}},
        "responses": {
            "200": {"description": "The outputs.", "content": {JSON: {"schema": {
                "type": "object", "required": ["model_name", "outputs"],
                "properties": {"model_name": {"type": "string"},
                               "model_version": {"type": "string"},
                               "id": {"type": "string"},
                               "outputs": {"type": "array", "items": TENSOR}}}},
                OCTETS: BINARY_BODY}},
            "400": _error("A malformed request (the message names the input or output "
                          "at fault), or the handler refused the inputs."),
            "408": _error("The body paused longer than body_timeout_seconds."),
            "413": _error("The body is larger than max_json_bytes, or than the "
                          "function's [limits] max_body."),
            "422": _error("The body the handler would get does not fit its typed "
                          "inputs (docs/function-api.md)."),
            "500": _error("The handler raised."),
            "502": _error("The instance failed, or the handler's answer is not "
                          "tensors."),
            "503": _retry("The function cannot run now (no capacity, circuit open, "
                          "build failed)."),
            "504": _error("A deadline passed (X-Thaw-Timeout, placement, or the "
                          "function's timeout)."),
            "507": _error("The instance ran out of memory."),
            **KEYED_ERRORS}}},
}


def _versioned(operation: dict[str, Any]) -> dict[str, Any]:
    return {**operation, "summary": operation["summary"] + " (the active version)",
            "parameters": [NAME_PARAM, VERSION_PARAM]}


OPENAPI_PATHS.update({
    f"/v2/models/{{name}}/versions/{{version}}{tail}": {
        method: _versioned(OPENAPI_PATHS[f"/v2/models/{{name}}{tail}"][method])}
    for tail, method in (("", "get"), ("/ready", "get"), ("/infer", "post"))})
