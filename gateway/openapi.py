"""The OpenAPI 3 document of the gateway's HTTP API, served at /openapi.json.

Hand-written (the routes are plain aiohttp handlers); tests/gateway/test_openapi.py
checks that it names exactly the routes the app serves and runs schemathesis against a
live gateway with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

from thaw.core.priority import PRIORITY_MAX, PRIORITY_MIN

JSON = "application/json"
ERROR_CODES_NOTE = (
    "Errors are JSON {\"error\": {\"code\", \"message\", \"field\"?}}; 429 and 503 carry "
    "Retry-After (seconds).")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    described = {
        400: "The request is malformed; `field` names the part at fault.",
        401: "No API key, or an unknown one.",
        403: "The API key lacks the scope for this.",
        404: "No such function (or model, or node) for this key's tenant.",
        409: "The name is taken.",
        413: "The body is larger than the gateway's max_body_bytes (an invocation's: "
             "than its function's [limits] max_body, if smaller).",
        429: "Rate limited (per API key; per address after failed logins) or the "
             "function's queue is full; see Retry-After.",
        502: "The instance failed while serving (crash, out of memory) or its node is "
             "unreachable.",
        503: "The function cannot run now: its build failed, no capacity, or its circuit "
             "is open after repeated failures; see Retry-After.",
        504: "A deadline passed: the client's X-Thaw-Timeout, placement, or the "
             "function's timeout.",
    }
    out: dict[str, Any] = {}
    for status in statuses:
        response = _json(_ref("Error"), described[status])
        if status in (429, 503):
            response["headers"] = {"Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer", "minimum": 1}}}
        out[str(status)] = response
    return out


PUBLIC: list[dict[str, list[str]]] = []  # `security: []`: no API key needed
NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}
INVOKE_ANSWERS = {
    JSON: {"schema": {}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "text/event-stream": {"schema": {"type": "string"}},
    "application/x-ndjson": {"schema": {"type": "string"}},
}
TIMEOUT_HEADER = {
    "name": "X-Thaw-Timeout", "in": "header", "required": False,
    "description": "The client's own deadline in seconds (placement + run); past it 504.",
    "schema": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
               "maximum": 86400}}
PRIORITY_HEADER = {
    "name": "X-Thaw-Priority", "in": "header", "required": False,
    "description": f"{PRIORITY_MIN}-{PRIORITY_MAX}, up to the key's priority_max (above: "
                   "403): the call's place among the function's waiting calls (default: "
                   "the function's "
                   "priority, else the key's priority_default). See gateway/priority.py.",
    "schema": {"type": "integer", "minimum": PRIORITY_MIN, "maximum": PRIORITY_MAX}}
# The function URL's stored-invocation headers (gateway/request.py, gateway/stored/).
PREFER_HEADER = {
    "name": "Prefer", "in": "header", "required": False,
    "description": "RFC 7240. `respond-async`: 202 at once with the invocation's id; the "
                   "call is queued and run by a gateway's worker. `wait=N`: hold the "
                   "request at most N seconds (capped by the gateway's sync_wait_seconds), "
                   "then 303 to the result URL (202 with respond-async). Values not "
                   "understood are ignored.",
    "schema": {"type": "string"}, "example": "respond-async, wait=5"}
IDEMPOTENCY_KEY_HEADER = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Per tenant: the first request with a key runs the function; every "
                   "other one gets the same answer (status and body) until the result "
                   "expires (result_ttl_seconds). The same key with another request "
                   "(function, path, content type or body): 422. A streaming call "
                   "(SSE) is never stored: the key only makes retries safe.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255}}
WEBHOOK_HEADER = {
    "name": "X-Thaw-Webhook", "in": "header", "required": False,
    "description": "An http(s) URL: the finished invocation (as GET /v1/invocations/{id} "
                   "shows it) is POSTed there, retried with exponential backoff. Makes "
                   "the call a stored invocation. Also `?webhook=<url>`.",
    "schema": {"type": "string", "format": "uri", "maxLength": 2048}}
ACCEPTED_BODY = {"type": "object", "required": ["id", "status", "url", "result_url"],
                 "properties": {
                     "id": {"type": "string", "description": "The invocation's id."},
                     "status": {"type": "string", "enum": ["queued", "running"]},
                     "url": {"type": "string"}, "result_url": {"type": "string"}}}
INVOCATION_ID_HEADER = {"X-Thaw-Invocation": {
    "description": "The stored invocation's id.", "schema": {"type": "string"}}}
REQUEST_ID_HEADER = {
    "name": "X-Request-ID", "in": "header", "required": False,
    "description": "Correlates logs of the gateway, the node and the handler; "
                   "[A-Za-z0-9._:-]{1,128}, else one is made up.",
    "schema": {"type": "string"}}


def _invoke_operation(summary: str, with_path: bool) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": "tenant", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    if with_path:
        params.append({"name": "path", "in": "path", "required": True,
                       "description": "Sub-path the handler sees as request.path.",
                       "schema": {"type": "string"}})
    return {
        "summary": summary,
        "description": "Sync by default. A generator handler streams: SSE with "
                       "`Accept: text/event-stream` (items as `data:`, then `event: done`, "
                       "or `event: error` if it fails midway), else NDJSON. The body "
                       "(JSON or raw bytes) may be up to the function's `[limits] "
                       "max_body`, capped by the gateway's max_body_bytes. A sync call "
                       "still running after the wait limit becomes a stored invocation "
                       "(303); `Prefer: respond-async` stores it at once (202); "
                       "`Idempotency-Key` and `X-Thaw-Webhook` store it too. See "
                       "/v1/invocations.",
        "parameters": [*params, TIMEOUT_HEADER, PRIORITY_HEADER, PREFER_HEADER,
                       IDEMPOTENCY_KEY_HEADER, WEBHOOK_HEADER, REQUEST_ID_HEADER,
                       {"name": "Accept", "in": "header", "required": False,
                        "schema": {"type": "string"}}],
        "requestBody": {"required": False, "content": {
            JSON: {"schema": {}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {
            "200": {"description": "The handler's answer (for an Idempotency-Key seen "
                                   "before: the first request's answer, whatever its "
                                   "status).", "content": INVOKE_ANSWERS,
                    "headers": {
                        "X-Thaw-Start": {"schema": {"type": "string",
                                                    "enum": ["warm", "restore", "fresh"]}},
                        "Server-Timing": {"schema": {"type": "string"}},
                        **INVOCATION_ID_HEADER}},
            "202": {"description": "Stored (`Prefer: respond-async`; with `wait=N`, still "
                                   "running after N seconds): poll Location, or fetch "
                                   "result_url.",
                    "content": {JSON: {"schema": ACCEPTED_BODY}},
                    "headers": {"Location": {"description": "/v1/invocations/{id}",
                                             "schema": {"type": "string"}},
                                **INVOCATION_ID_HEADER}},
            "303": {"description": "Still running past the wait limit (sync_wait_seconds, "
                                   "or a shorter `Prefer: wait=N`): the call goes on as a "
                                   "stored invocation; its answer is at Location.",
                    "content": {JSON: {"schema": ACCEPTED_BODY}},
                    "headers": {"Location": {"description": "/v1/invocations/{id}/result",
                                             "schema": {"type": "string"}},
                                **INVOCATION_ID_HEADER}},
            "400": {"description": "Malformed request (a bad X-Thaw-Timeout, "
                                   "X-Thaw-Priority, Idempotency-Key or X-Thaw-Webhook: "
                                   "`field` names it), or the handler refused the input.",
                    "content": {JSON: {"schema": _ref("Error")}}},
            "403": _json(_ref("Error"), "The API key lacks the invoke scope, or "
                                        "X-Thaw-Priority is above its priority_max."),
            "409": _json(_ref("Error"), "The Idempotency-Key's invocation was cancelled: "
                                        "it has no answer to repeat."),
            "410": _json(_ref("Error"), "The Idempotency-Key's invocation expired while "
                                        "this request waited for it (rare: an expired "
                                        "key is free again)."),
            "413": _json(_ref("Error"), "The body is larger than the function's [limits] "
                                        "max_body (or the gateway's max_body_bytes); "
                                        "refused before it is read when Content-Length "
                                        "says so."),
            "422": _json(_ref("Error"), "The body does not match the function's typed "
                                        "inputs (code invalid_input; `field` is the "
                                        "input's path, see /fn/{tenant}/{name}/"
                                        "openapi.json), or the Idempotency-Key was used "
                                        "for a different request."),
            "404": {"description": "Not found, or the handler has no such sub-path.",
                    "content": {JSON: {"schema": _ref("Error")}}},
            "405": {"description": "The handler does not take this method.",
                    "content": {JSON: {"schema": _ref("Error")}}},
            "500": {"description": "The handler raised.",
                    "content": {JSON: {"schema": _ref("Error")}}},
            "507": {"description": "The instance ran out of memory.",
                    "content": {JSON: {"schema": _ref("Error")}}},
            **_errors(401, 429, 502, 503, 504)},
    }


def _openai_operation(summary: str, body: str, streams: bool) -> dict[str, Any]:
    content: dict[str, Any] = {JSON: {"schema": {"type": "object"}}}
    if streams:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {
        "summary": summary,
        "tags": ["openai"],
        "parameters": [TIMEOUT_HEADER, PRIORITY_HEADER, REQUEST_ID_HEADER],
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref(body)}}},
        "responses": {
            "200": {"description": "The function's OpenAI-format answer"
                                   + (" (SSE ending in `data: [DONE]` when `stream` is "
                                      "true)." if streams else "."),
                    "content": content},
            "500": {"description": "The handler raised.",
                    "content": {JSON: {"schema": _ref("Error")}}},
            **_errors(400, 401, 403, 404, 413, 429, 502, 503, 504)},
    }


def document_with(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The whole document: the core routes' paths and each feature's `parts`."""
    document = _core_document()
    for paths in parts:
        for path, item in paths.items():
            # Merged per method: a module may add PATCH to a path the core serves.
            document["paths"].setdefault(path, {}).update(item)
    return document


def _core_document() -> dict[str, Any]:
    try:
        version = metadata.version("thaw")
    except metadata.PackageNotFoundError:
        version = "0"
    name_param = {"name": "name", "in": "path", "required": True, "schema": NAME}
    node_query = {"name": "node", "in": "query", "required": False,
                  "description": "Only this node (default: every node holding it).",
                  "schema": {"type": "string"}}
    tier_reply = {"type": "object", "required": ["nodes", "bytes"], "properties": {
        "nodes": {"type": "array", "items": {"type": "string"}},
        "bytes": {"type": "integer"}, "seconds": {"type": "number"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "thaw gateway", "version": version,
                 "description": "Serverless GPU functions whose cold start is a snapshot "
                                "restore. " + ERROR_CODES_NOTE},
        "security": [{"bearer": []}],
        "paths": {
            "/": {"get": {"summary": "Dashboard", "security": PUBLIC, "responses": {
                "200": {"description": "HTML", "content": {"text/html": {
                    "schema": {"type": "string"}}}}}}},
            "/healthz": {"get": {"summary": "Liveness", "security": PUBLIC, "responses": {
                "200": _json(_ref("Status"), "Up.")}}},
            "/readyz": {"get": {"summary": "Readiness (the scheduler is reachable)",
                                "security": PUBLIC, "responses": {
                                    "200": _json(_ref("Status"), "Ready."),
                                    "503": _json(_ref("Error"), "Scheduler unreachable.")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics of this replica "
                                            "(the platform operator's key only)",
                                 "responses": {
                                     "200": {"description": "Prometheus text format",
                                             "content": {"text/plain": {
                                                 "schema": {"type": "string"}}}},
                                     **_errors(401, 403, 429)}}},
            "/openapi.json": {"get": {"summary": "This document", "security": PUBLIC,
                                      "responses": {"200": _json({"type": "object"},
                                                                 "OpenAPI 3")}}},
            "/v1/functions": {
                "post": {
                    "summary": "Deploy a bundle (tarball with thaw.toml); builds its snapshot",
                    "description": (
                        "The body is always a bundle: the gateway and scheduler cannot "
                        "read container images. A function that runs in an image names "
                        "it in thaw.toml, pinned to the image id: `[runtime] image = "
                        "\"repo:tag@sha256:<id>\"` (`thaw deploy IMAGE` copies the "
                        "bundle out of a local image and writes it). A malformed "
                        "reference is a 400 with field `runtime.image`; such a function "
                        "builds and runs on docker-runtime nodes only, and fails at once "
                        "when there is none."),
                    "parameters": [{"name": "wait", "in": "query", "required": False,
                                    "description": "Answer after the snapshot build.",
                                    "schema": {"type": "boolean"}},
                                   {"name": "force", "in": "query", "required": False,
                                    "description": "A new version (and build) even "
                                                   "when the bundle is the one serving.",
                                    "schema": {"type": "boolean"}}],
                    "requestBody": {"required": True, "content": {
                        "application/gzip": {"schema": {"type": "string",
                                                        "format": "binary"}},
                        "application/octet-stream": {"schema": {"type": "string",
                                                                "format": "binary"}},
                        "multipart/form-data": {"schema": {
                            "type": "object", "required": ["bundle"],
                            "properties": {"bundle": {"type": "string",
                                                      "format": "binary"}}}}}},
                    "responses": {"201": _json(_ref("Function"), "Deployed: a new "
                                               "version (`unchanged` false)."),
                                  "200": _json(_ref("Function"), "The bundle the function "
                                               "serves already (same digest): its "
                                               "version is kept, nothing is built "
                                               "(`unchanged` true)."),
                                  **_errors(400, 401, 403, 413, 503, 504)}},
                "get": {"summary": "This tenant's functions", "responses": {
                    "200": _json({"type": "object", "required": ["functions"],
                                  "properties": {"functions": {
                                      "type": "array", "items": _ref("Function")}}},
                                 "Functions."),
                    **_errors(401)}},
            },
            "/v1/functions/{name}": {
                "get": {"summary": "One function", "parameters": [name_param],
                        "responses": {"200": _json(_ref("Function"), "The function."),
                                      **_errors(400, 401, 404)}},
                "delete": {"summary": "Delete a function", "parameters": [name_param],
                           "responses": {"204": {"description": "Deleted."},
                                         **_errors(400, 401, 403, 404)}},
            },
            "/v1/functions/{name}/prewarm": {"post": {
                "summary": "Move the function's snapshot into nodes' host-memory tier",
                "description": "With `Accept: application/x-ndjson`: progress lines per "
                               "node (done_bytes, total_bytes, ...), then the summary.",
                "parameters": [name_param, node_query],
                "responses": {"200": {"description": "Prewarmed (or NDJSON progress).",
                                      "content": {JSON: {"schema": tier_reply},
                                                  "application/x-ndjson": {
                                                      "schema": {"type": "string"}}}},
                              **_errors(400, 401, 403, 404, 503)}}},
            "/v1/functions/{name}/evict": {"post": {
                "summary": "Drop the function's snapshot from nodes' host-memory tier",
                "parameters": [name_param, node_query],
                "responses": {"200": _json(tier_reply, "Evicted."),
                              **_errors(400, 401, 403, 404, 503)}}},
            "/v1/nodes": {"get": {"summary": "Nodes (admin)", "responses": {
                "200": _json({"type": "object", "required": ["nodes"], "properties": {
                    "nodes": {"type": "array", "items": {"type": "object"}}}}, "Nodes."),
                **_errors(401, 403)}}},
            "/v1/events": {"get": {
                "summary": "The scheduler's event log: pressure, nodes lost, evictions (admin)",
                "parameters": [
                    {"name": "after", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 0,
                                "maximum": 9223372036854775807}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 0, "maximum": 10000}},
                    {"name": "kind", "in": "query", "required": False,
                     "schema": {"type": "string"}}],
                "responses": {"200": _json({"type": "object", "required": ["events"],
                                            "properties": {
                                                "last_seq": {"type": "integer"},
                                                "events": {"type": "array",
                                                           "items": {"type": "object"}}}},
                                           "Events."),
                              **_errors(400, 401, 403)}}},
            "/v1/nodes/{node}/{action}": {"post": {
                "summary": "Cordon or uncordon a node (admin)",
                "parameters": [
                    {"name": "node", "in": "path", "required": True,
                     "schema": {"type": "string"}},
                    {"name": "action", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": ["cordon", "uncordon"]}}],
                "responses": {"200": _json({"type": "object"}, "The node."),
                              **_errors(401, 403, 404)}}},
            "/v1/models": {"get": {
                "summary": "OpenAI: this tenant's ready functions as models",
                "tags": ["openai"],
                "responses": {"200": _json(_ref("ModelList"), "Models."),
                              **_errors(401, 403)}}},
            "/v1/models/{model}": {"get": {
                "summary": "OpenAI: one model", "tags": ["openai"],
                "parameters": [{"name": "model", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json(_ref("Model"), "The model."),
                              **_errors(401, 403, 404)}}},
            "/v1/chat/completions": {"post": _openai_operation(
                "OpenAI chat completions, served by the function named by `model`",
                "ChatCompletionRequest", streams=True)},
            "/v1/completions": {"post": _openai_operation(
                "OpenAI completions, served by the function named by `model`",
                "CompletionRequest", streams=True)},
            "/v1/embeddings": {"post": _openai_operation(
                "OpenAI embeddings, served by the function named by `model` (natively, "
                "or translated to predict(texts=[...]))", "EmbeddingRequest",
                streams=False)},
            "/fn/{tenant}/{name}": {"post": _invoke_operation("Invoke a function",
                                                              with_path=False)},
            "/fn/{tenant}/{name}/{path}": {"post": _invoke_operation(
                "Invoke a function at a sub-path", with_path=True)},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "An API key: thaw_…"}},
            "schemas": _schemas(),
        },
    }


def _schemas() -> dict[str, Any]:
    message = {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string"}, "content": {}}}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"},
                "field": {"type": "string"}}}}},
        "Status": {"type": "object", "required": ["status"],
                   "properties": {"status": {"type": "string"}}},
        "Function": {"type": "object", "required": ["name", "tenant", "state", "url"],
                     "properties": {
                         "name": {"type": "string"}, "tenant": {"type": "string"},
                         "version": {"type": "string"},
                         "state": {"type": "string",
                                   "enum": ["building", "ready", "failed", "deleted"]},
                         "reason": {"type": "string"}, "start_mode": {"type": "string"},
                         "handler": {"type": "string"}, "bundle_digest": {"type": "string"},
                         "snapshot_bytes": {"type": "integer"},
                         "warm_instances": {"type": "integer"},
                         "priority": {"type": "integer", "nullable": True,
                                      "description": f"Default priority ({PRIORITY_MIN}-"
                                                     f"{PRIORITY_MAX}) of its "
                                                     "invocations; null: the key's."},
                         "config": {"type": "object"}, "created_at": {"type": "number"},
                         "updated_at": {"type": "number"}, "url": {"type": "string"},
                         "active_version": {"type": "integer", "nullable": True,
                                            "description": "The version serving."},
                         "latest_build": {"type": "object", "nullable": True,
                                          "description": "The newest deploy's version "
                                                         "(see /versions)."},
                         "unchanged": {"type": "boolean",
                                       "description": "Deploy answers only: the bundle "
                                                      "was the one serving, kept."}}},
        "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"],
                  "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                                 "created": {"type": "integer"},
                                 "owned_by": {"type": "string"}}},
        "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"type": "string"}, "data": {"type": "array",
                                                   "items": _ref("Model")}}},
        "ChatCompletionRequest": {
            "type": "object", "required": ["model", "messages"], "properties": {
                "model": {"type": "string", "description": "The function's name."},
                "messages": {"type": "array", "items": message},
                "stream": {"type": "boolean"},
                "max_tokens": {"type": "integer", "minimum": 1},
                "temperature": {"type": "number", "minimum": 0}}},
        "CompletionRequest": {
            "type": "object", "required": ["model", "prompt"], "properties": {
                "model": {"type": "string", "description": "The function's name."},
                "prompt": {"type": "string"}, "stream": {"type": "boolean"},
                "max_tokens": {"type": "integer", "minimum": 1},
                "temperature": {"type": "number", "minimum": 0}}},
        "EmbeddingRequest": {
            "type": "object", "required": ["model", "input"], "properties": {
                "model": {"type": "string", "description": "The function's name."},
                "input": {"oneOf": [{"type": "string"},
                                    {"type": "array", "items": {"type": "string"}}]},
                "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                "dimensions": {"type": "integer", "minimum": 1}}},
    }
