"""OpenAI-compatible routes (DESIGN.md §9): `model` names a function of the caller's
tenant, and the function answers in OpenAI's formats.

Contract for a function behind these routes:
- `/v1/chat/completions`, `/v1/completions`: the function gets the OpenAI request body
  unchanged at that sub-path (`__call__(request)`: `request.path` is
  "/v1/chat/completions", `request.json()` the body) and returns the OpenAI response
  object, or with `"stream": true` a generator of chunk objects. The gateway turns the
  runtime's stream ends into OpenAI's: `event: done` -> `data: [DONE]`, `event: error`
  -> `data: {"error": ...}`.
- `/v1/embeddings`: the same (native) when the function takes the OpenAI body. A
  function with only `predict(texts=[...])` returning `{"embeddings": [[float, ...]]}`
  (examples/embed) is served too: the gateway sees the runtime refuse the OpenAI body
  before the handler runs ("predict(): unexpected keyword"), remembers that this
  function wants `texts`, and from then on translates both ways (`input` -> `texts`,
  vectors -> `data[]`, float or base64 as `encoding_format` asks). Token counts are
  not known to the gateway and are reported as 0.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from aiohttp import web
from cachetools import TTLCache

from thaw.core.errors import InvalidArgument, NotFound, ThawError
from thaw.core.spec import NAME_PATTERN
from thaw.gateway import jsonbody, tracing
from thaw.gateway.admit import admit, new_call
from thaw.gateway.budgets import StreamTokens, answer_tokens, counts_tokens
from thaw.gateway.cost import add_cost, wants_cost
from thaw.gateway.dispatch import Exchange, Settlement, StreamBroken
from thaw.gateway.errors import BadFunctionAnswer
from thaw.gateway.priority import call_priority, check_body_size
from thaw.gateway.relay import answer_headers, finish_stream, relay
from thaw.gateway.request import TIMEOUT_HEADER, client_timeout, read_body
from thaw.gateway.sse import SSE_CONTENT_TYPE, EventParser, error_json
from thaw.gateway.state import (
    ERROR_CODE_KEY,
    FUNCTION_KEY,
    GATEWAY_KEY,
    PRINCIPAL_KEY,
    START_KEY,
    Gateway,
)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
# How long the gateway remembers that a function wants the `texts` contract; a
# redeploy through this replica forgets at once, through another one after this.
CONTRACT_MEMORY_SECONDS = 300.0
CONTRACTS_KEY = web.AppKey("embedding_contracts", TTLCache)
# The runtime's message when predict() cannot take the body's keys (handler.py's
# InvalidInput, as events.describe_exception words it).
PREDICT_BINDING_PREFIX = "InvalidInput: predict(): "
DONE_EVENT = b"data: [DONE]\n\n"


def _request_json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise InvalidArgument(f"the body must be a JSON object: {exc}", field="body") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument("the body must be a JSON object", field="body")
    return doc


def _model(doc: dict[str, Any]) -> str:
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("'model' (the function's name) is required", field="model")
    if not NAME_PATTERN.match(model):
        raise NotFound(f"model {model!r} not found", field="model")
    return model


async def _open(request: web.Request, gw: Gateway, path: str, body: bytes, model: str,
                stream: bool, timeout: float | None) -> Exchange:
    p = request[PRINCIPAL_KEY]
    headers = {"Content-Type": "application/json",
               "Accept": SSE_CONTENT_TYPE if stream else "application/json"}
    priority = await call_priority(request, gw, p, p.tenant, model)
    tracing.admitted(p.tenant, model)
    call = new_call(request, p.tenant, model, path, body, headers, timeout, priority)
    request[FUNCTION_KEY] = call.function
    ex = await gw.dispatcher.open(call)
    request[START_KEY] = ex.start
    return ex


async def _prepare(request: web.Request) -> tuple[Gateway, dict[str, Any], bytes,
                                                  float | None]:
    gw = request.app[GATEWAY_KEY]
    request[PRINCIPAL_KEY] = await admit(request, gw)
    timeout = client_timeout(request.headers.get(TIMEOUT_HEADER))
    body = await read_body(request, gw.config.max_body_bytes)
    return gw, _request_json(body), body, timeout


async def _generate(request: web.Request, path: str) -> web.StreamResponse:
    gw, doc, body, timeout = await _prepare(request)
    model = _model(doc)
    # The function is named inside the body: its own limit is checked once read.
    await check_body_size(request, gw, request[PRINCIPAL_KEY].tenant, model, len(body))
    stream = doc.get("stream") is True
    # Token budgets (gateway/budgets.py): refused once spent; the answer's usage is
    # counted after the call, read only when the caller has a token budget.
    p = request[PRINCIPAL_KEY]
    gw.limiter.budgets.check_tokens(p)
    tokens = StreamTokens() if counts_tokens(p) else None
    async with await _open(request, gw, path, body, model, stream, timeout) as ex:
        if stream and ex.status == 200 and ex.content_type.startswith(SSE_CONTENT_TYPE):
            out = await _relay_openai_stream(request, ex, tokens)
            if tokens is not None:
                gw.limiter.budgets.spend(p, tokens.total)
            return out
        if tokens is not None and ex.status == 200 and ex.buffered:
            answer = await ex.read()
            gw.limiter.budgets.spend(p, answer_tokens(answer))
            headers = answer_headers(ex, buffered=True)
            if wants_cost(request):
                await add_cost(request, ex, headers)
            return web.Response(status=ex.status, body=answer, headers=headers)
        return await relay(request, ex)


@tracing.traced
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, CHAT_PATH)


@tracing.traced
async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, COMPLETIONS_PATH)


def _openai_event(event: str | None, data: str) -> bytes:
    if event == "done":
        return DONE_EVENT
    # Items, and the runtime's {"error": ...} (which OpenAI clients raise on).
    return b"data: " + data.encode() + b"\n\n"


async def _relay_openai_stream(request: web.Request, ex: Exchange,
                               tokens: StreamTokens | None = None) -> web.StreamResponse:
    out = web.StreamResponse(status=200, headers=answer_headers(ex, buffered=False))
    await out.prepare(request)
    parser = EventParser()
    clock = ex.dispatcher.metrics.streams.clock(ex.call.function, "openai", ex.started)
    try:
        async for chunk in ex.chunks():
            found = list(parser.feed(chunk))
            if found and clock is not None:
                clock.tick()
            if tokens is not None:
                for e in found:
                    tokens.feed(e.data)
            events = b"".join(_openai_event(e.event, e.data) for e in found)
            if events:
                await out.write(events)
    except ThawError as exc:
        ex.settle(Settlement.BROKEN if isinstance(exc, StreamBroken) else Settlement.ABORTED)
        request[ERROR_CODE_KEY] = exc.code
        await finish_stream(out, b"data: " + error_json(exc.code, exc.message) + b"\n\n")
        return out
    except ConnectionError:
        ex.settle(Settlement.ABORTED)
        return out
    except ValueError as exc:  # an event past MAX_EVENT_BYTES
        ex.settle(Settlement.ABORTED)
        await finish_stream(out, b"data: " + error_json("invalid_stream", str(exc)) + b"\n\n")
        return out
    await finish_stream(out)
    return out


# ---- embeddings -------------------------------------------------------------------

def _texts(doc: dict[str, Any]) -> list[str]:
    value = doc.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise InvalidArgument("'input' must be a string or a non-empty list of strings "
                          "(token arrays need a function that takes the OpenAI body)",
                          field="input")


def _is_binding_refusal(status: int, body: bytes) -> bool:
    if status != 400:
        return False
    try:
        error = jsonbody.loads(body)["error"]
        return bool(error["code"] == "invalid_argument"
                    and str(error["message"]).startswith(PREDICT_BINDING_PREFIX))
    except (ValueError, KeyError, TypeError):
        return False


def _embedding_value(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _to_openai_embeddings(result: Any, model: str, doc: dict[str, Any],
                          count: int) -> dict[str, Any]:
    vectors = result.get("embeddings") if isinstance(result, dict) else None
    if (not isinstance(vectors, list) or len(vectors) != count
            or not all(isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
                       for v in vectors)):
        raise BadFunctionAnswer(f"function {model} did not answer with {{'embeddings': "
                                f"[[float, ...] x {count}]}}")
    dimensions = doc.get("dimensions")
    if dimensions is not None and vectors and dimensions != len(vectors[0]):
        raise InvalidArgument(f"model {model} makes {len(vectors[0])}-dimensional "
                              f"embeddings, not {dimensions}", field="dimensions")
    encoding = doc.get("encoding_format") or "float"
    return {
        "object": "list",
        "model": model,
        "data": [{"object": "embedding", "index": i,
                  "embedding": _embedding_value(v, encoding)} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }


@tracing.traced
async def embeddings(request: web.Request) -> web.StreamResponse:
    gw, doc, body, timeout = await _prepare(request)
    model = _model(doc)
    # The function is named inside the body: its own limit is checked once read.
    await check_body_size(request, gw, request[PRINCIPAL_KEY].tenant, model, len(body))
    encoding = doc.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise InvalidArgument("'encoding_format' must be 'float' or 'base64'",
                              field="encoding_format")
    contracts: TTLCache[str, str] = request.app[CONTRACTS_KEY]
    key = f"{request[PRINCIPAL_KEY].tenant}/{model}"
    if contracts.get(key) != "texts":
        async with await _open(request, gw, EMBEDDINGS_PATH, body, model, False,
                               timeout) as ex:
            if ex.status != 400:
                return await relay(request, ex)
            answer = await ex.read()
            if not _is_binding_refusal(ex.status, answer):
                return web.Response(status=ex.status, body=answer,
                                    headers=answer_headers(ex, buffered=True))
        contracts[key] = "texts"
    texts = _texts(doc)
    translated = json.dumps({"texts": texts}).encode()
    async with await _open(request, gw, EMBEDDINGS_PATH, translated, model, False,
                           timeout) as ex:
        answer = await ex.read()
        headers = answer_headers(ex, buffered=True)
        if ex.status != 200:
            if _is_binding_refusal(ex.status, answer):
                contracts.pop(key, None)  # redeployed with another contract: probe again
            return web.Response(status=ex.status, body=answer, headers=headers)
    try:
        result = jsonbody.loads(answer)
    except ValueError as exc:
        raise BadFunctionAnswer(f"function {model} answered with invalid JSON: {exc}") from exc
    headers.pop("Content-Type", None)
    return web.json_response(_to_openai_embeddings(result, model, doc, len(texts)),
                             headers=headers)


# ---- models -------------------------------------------------------------------------

def _model_json(fn: Any) -> dict[str, Any]:
    return {"id": fn.name, "object": "model", "created": int(fn.created_at),
            "owned_by": fn.tenant}


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    p = await admit(request, gw)
    fns = await gw.scheduler.list_functions(p.tenant)
    return web.json_response({"object": "list", "data": [
        _model_json(fn) for fn in fns if fn.state == "ready"]})


async def get_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    p = await admit(request, gw)
    model = request.match_info["model"]
    if not NAME_PATTERN.match(model):
        raise NotFound(f"model {model!r} not found", field="model")
    fn = await gw.scheduler.get_function(p.tenant, model)
    if fn.state != "ready":
        raise NotFound(f"model {model!r} is {fn.state}, not ready", field="model")
    return web.json_response(_model_json(fn))


def add_routes(app: web.Application) -> None:
    app[CONTRACTS_KEY] = TTLCache(maxsize=10_000, ttl=CONTRACT_MEMORY_SECONDS)
    r = app.router
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model}", get_model)
    r.add_post(CHAT_PATH, chat_completions)
    r.add_post(COMPLETIONS_PATH, completions)
    r.add_post(EMBEDDINGS_PATH, embeddings)
