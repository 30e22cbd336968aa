"""A function's own API document: `GET /fn/{tenant}/{name}/openapi.json` (OpenAPI
3.1, its typed inputs as the request body) and `GET /fn/{tenant}/{name}/docs` (the
same as a plain HTML page: the function origin's CSP allows no script or style, so
it is a table). Whoever may call the function may read them (a key with the invoke
scope, or anyone for a public function); the inputs come from its input schema
(gateway/inputs.py), as the gateway checks them."""

from __future__ import annotations

import html
import json
from typing import Any

from aiohttp import web

from thaw.core.errors import NotFound
from thaw.gateway.admit import admit
from thaw.gateway.inputs import read_schema
from thaw.gateway.openapi import JSON, _errors, _json
from thaw.gateway.priority import function_knobs
from thaw.gateway.state import GATEWAY_KEY
from thaw.snapshotter.runtime.signature import OUTPUT_KEY

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"},
            "field": {"type": "string"}}}}}


async def _function_schema(request: web.Request) -> tuple[str, str, dict[str, Any] | None]:
    gw = request.app[GATEWAY_KEY]
    tenant, name = request.match_info["tenant"], request.match_info["name"]
    p = await admit(request, gw)
    if p.tenant != tenant:
        # Not 403: another tenant's function names are not disclosed.
        raise NotFound(f"function {tenant}/{name} not found", field="name")
    knobs = await function_knobs(request, gw, tenant, name)
    return tenant, name, read_schema(knobs.input_schema)


def function_document(tenant: str, name: str, schema: dict[str, Any] | None,
                      server: str) -> dict[str, Any]:
    """The OpenAPI document of one function's URL."""
    if schema is None:
        body: dict[str, Any] = {"required": False, "description": (
            "The function declares no typed inputs: the body reaches it as sent."),
            "content": {JSON: {"schema": {}},
                        "application/octet-stream": {"schema": {"type": "string",
                                                                "format": "binary"}}}}
    else:
        inputs = {k: v for k, v in schema.items() if k != OUTPUT_KEY}
        body = {"required": bool(schema.get("required")),
                "content": {JSON: {"schema": inputs}}}
    answer: dict[str, Any] = {"description": "The function's answer (JSON, bytes, or a "
                                             "stream)."}
    output = schema.get(OUTPUT_KEY) if schema is not None else None
    if isinstance(output, dict):
        answer = {"description": "The function's answer, as its return type says.",
                  "content": {JSON: {"schema": output}}}
    error = {"description": "", "content": {JSON: {"schema": ERROR_SCHEMA}}}
    responses: dict[str, Any] = {
        "200": answer,
        **{status: {**error, "description": answer["description"]}
           for status, answer in _errors(401, 403, 404, 413, 429, 502, 503, 504).items()},
        "500": {**error, "description": "The handler raised."}}
    if schema is not None:
        responses["422"] = {**error, "description": (
            "An input does not match: code invalid_input, `field` is its path.")}
    return {
        "openapi": "3.1.0",
        "info": {"title": f"{tenant}/{name}", "version": "active"},
        "servers": [{"url": server}],
        "paths": {f"/fn/{tenant}/{name}": {"post": {
            "operationId": "call", "summary": f"Call {tenant}/{name}",
            "requestBody": body, "responses": responses,
            "security": [{"bearer": []}]}}},
        "components": {"securitySchemes": {"bearer": {"type": "http",
                                                      "scheme": "bearer"}}},
    }


async def openapi_view(request: web.Request) -> web.Response:
    tenant, name, schema = await _function_schema(request)
    server = f"{request.scheme}://{request.host}"
    return web.json_response(function_document(tenant, name, schema, server))


def _type_text(schema: Any) -> str:
    # One level of nesting is shown; deeper is "…": the schema is tenant data.
    if not isinstance(schema, dict):
        return "any"
    if isinstance(schema.get("enum"), list):
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"][:50])
    if isinstance(schema.get("anyOf"), list):
        return " or ".join(_leaf_type(part) for part in schema["anyOf"][:10])
    return _leaf_type(schema)


def _leaf_type(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "any"
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items")
        inner = items.get("type") if isinstance(items, dict) else None
        return f"array of {inner}" if isinstance(inner, str) else "array"
    if isinstance(schema.get("enum"), list):
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"][:50])
    return kind if isinstance(kind, str) else "any"


_LIMITS = (("minimum", "≥ {}"), ("maximum", "≤ {}"), ("minLength", "at least {} chars"),
           ("maxLength", "at most {} chars"), ("pattern", "matches {}"))


def docs_page(tenant: str, name: str, schema: dict[str, Any] | None) -> str:
    """The HTML page of one function's inputs (no script, no style)."""
    e = html.escape
    title = e(f"{tenant}/{name}")
    rows = []
    if schema is not None:
        required = set(schema.get("required") or ())
        properties = schema.get("properties")
        for key, prop in (properties.items() if isinstance(properties, dict) else ()):
            prop = prop if isinstance(prop, dict) else {}
            limits = [text.format(json.dumps(prop[k])) for k, text in _LIMITS if k in prop]
            default = json.dumps(prop["default"]) if "default" in prop else ""
            rows.append("<tr>" + "".join(f"<td>{e(str(cell))}</td>" for cell in (
                key, _type_text(prop), "yes" if key in required else "no", default,
                "; ".join(limits), prop.get("description") or "")) + "</tr>")
    if schema is None:
        inputs = "<p>This function declares no typed inputs: the body reaches it as sent.</p>"
    elif not rows:
        inputs = "<p>This function takes no inputs.</p>"
    else:
        inputs = ("<table border=\"1\"><thead><tr><th>Input</th><th>Type</th>"
                  "<th>Required</th><th>Default</th><th>Limits</th><th>Description</th>"
                  "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    output = schema.get(OUTPUT_KEY) if schema is not None else None
    if output is not None:
        inputs += f"<p>Returns: {e(_type_text(output))}</p>"
    example = e(f"curl -X POST -H 'Authorization: Bearer $THAW_KEY' "
                f"-H 'Content-Type: application/json' -d '{{...}}' <this origin>/fn/"
                f"{tenant}/{name}")
    return ("<!doctype html><html><head><meta charset=\"utf-8\">"
            f"<title>{title}</title></head><body><h1>{title}</h1>"
            f"<p>POST a JSON object of these inputs to <code>/fn/{title}</code>. A wrong "
            "input is answered 422 with <code>error.field</code> naming it.</p>"
            f"{inputs}<pre>{example}</pre>"
            f"<p><a href=\"/fn/{title}/openapi.json\">OpenAPI document</a></p>"
            "</body></html>")


async def docs_view(request: web.Request) -> web.Response:
    tenant, name, schema = await _function_schema(request)
    return web.Response(text=docs_page(tenant, name, schema), content_type="text/html")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/fn/{tenant}/{name}/openapi.json", openapi_view)
    app.router.add_get("/fn/{tenant}/{name}/docs", docs_view)


_PARAMS = [{"name": "tenant", "in": "path", "required": True, "schema": {"type": "string"}},
           {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]

OPENAPI_PATHS: dict[str, Any] = {
    "/fn/{tenant}/{name}/openapi.json": {"get": {
        "summary": "A function's own OpenAPI document (its typed inputs as the body)",
        "description": "On the function origin; readable by whoever may call it.",
        "parameters": _PARAMS,
        "responses": {"200": _json({"type": "object", "required": ["openapi", "paths"]},
                                   "The document."),
                      **_errors(400, 401, 403, 404, 429, 503)}}},
    "/fn/{tenant}/{name}/docs": {"get": {
        "summary": "A function's inputs as an HTML page",
        "parameters": _PARAMS,
        "responses": {"200": {"description": "The page.",
                              "content": {"text/html": {"schema": {"type": "string"}}}},
                      **_errors(400, 401, 403, 404, 429, 503)}}},
}
