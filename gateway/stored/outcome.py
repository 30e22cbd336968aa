"""Running a call to a stored result: the dispatch path's exchange read whole into an
Outcome, and the Outcome turned into the scheduler's completion request."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from dataclasses import dataclass

from thaw.core.errors import ThawError
from thaw.core.priority import PRIORITY_DEFAULT
from thaw.gateway import jsonbody
from thaw.gateway.dispatch import Call, Exchange
from thaw.gateway.errors import PayloadTooLarge, error_body, status_of
from thaw.gateway.files import Files, carries_files
from thaw.gateway.relay import answer_headers
from thaw.gateway.state import Gateway
from thaw.gateway.stored.result_files import FILE_REFS_TYPE, store_files
from thaw.proto import invocations_pb2


@dataclass(frozen=True)
class Outcome:
    """A finished call, as stored: the function's answer or the platform's error."""

    succeeded: bool
    status: int
    content_type: str
    body: bytes
    error_code: str = ""
    error_message: str = ""
    start: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    """The answer's platform headers (X-Thaw-Node, Server-Timing...) for the client
    that waited for it; not stored."""


def error_outcome(exc: ThawError, start: str = "") -> Outcome:
    return Outcome(False, status_of(exc), "application/json",
                   json.dumps(error_body(exc.code, exc.message, exc.field)).encode(),
                   exc.code, exc.message, start)


def answer_outcome(status: int, content_type: str, body: bytes, start: str) -> Outcome:
    if status < 400:
        return Outcome(True, status, content_type, body, start=start)
    code, message = "function_error", f"the function answered {status}"
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        err = jsonbody.loads(body)["error"]
        code, message = str(err["code"]), str(err.get("message", message))
    return Outcome(False, status, content_type, body, code, message, start)


async def read_capped(ex: Exchange, limit: int) -> bytes:
    if ex.buffered:
        return await ex.read()
    body = bytearray()
    async for chunk in ex.chunks():
        body.extend(chunk)
        if len(body) > limit:
            raise PayloadTooLarge(f"the function's answer is larger than this gateway's "
                                  f"limit of {limit} bytes for a stored result "
                                  "(max_body_bytes)", field="result")
    return bytes(body)


async def finish_exchange(opening: asyncio.Future[Exchange], limit: int) -> Outcome:
    """The outcome of a call whose exchange is being opened."""
    start = ""
    try:
        ex = await opening
        start = ex.start
        async with ex:
            body = await read_capped(ex, limit)
            return dataclasses.replace(
                answer_outcome(ex.status, ex.content_type, body, ex.start),
                headers=tuple(answer_headers(ex, True).items()))
    except ThawError as exc:
        return error_outcome(exc, start)


async def keep_files(files: Files | None, tenant: str, outcome: Outcome,
                     keep_seconds: float) -> Outcome:
    """The outcome as it is stored: a succeeded answer that carries files
    (FILES_CONTENT_TYPE) has them put in the file store for `keep_seconds` and is
    recorded as FILE_REFS_TYPE, read back as signed URLs (result_files.py); a file
    that cannot be stored (a full quota, bad base64) fails the invocation."""
    if files is None or not outcome.succeeded or not carries_files(outcome.content_type):
        return outcome
    try:
        body = await asyncio.to_thread(store_files, files, tenant, outcome.body,
                                       keep_seconds)
    except ThawError as exc:
        return error_outcome(exc, outcome.start)
    except ValueError as exc:
        return error_outcome(ThawError(f"the function's answer with files is not valid "
                                       f"JSON: {exc}"), outcome.start)
    return dataclasses.replace(outcome, content_type=FILE_REFS_TYPE, body=body)


def completion(invocation_id: str, gateway_id: str, outcome: Outcome, ttl: float,
               webhook_claim_seconds: float = 0.0
               ) -> invocations_pb2.CompleteInvocationRequest:
    return invocations_pb2.CompleteInvocationRequest(
        id=invocation_id, gateway_id=gateway_id,
        state="succeeded" if outcome.succeeded else "failed",
        result_status=outcome.status, result_content_type=outcome.content_type,
        result_body=outcome.body, error_code=outcome.error_code,
        error_message=outcome.error_message, start=outcome.start, ttl_seconds=ttl,
        webhook_claim_seconds=webhook_claim_seconds)


def call_of(inv: invocations_pb2.Invocation) -> Call:
    try:
        headers = {str(k): str(v) for k, v in json.loads(inv.headers_json or "{}").items()}
    except (ValueError, AttributeError):
        headers = {}
    return Call(tenant=inv.tenant, name=inv.function, path=inv.path, body=inv.body,
                headers=headers, request_id=inv.id,
                timeout=inv.timeout_seconds or None,
                received=asyncio.get_running_loop().time(), key_id=inv.key_id,
                priority=inv.priority or PRIORITY_DEFAULT)


def run(gw: Gateway, call: Call) -> asyncio.Future[Outcome]:
    """Dispatch `call` and read its answer to an Outcome, as a running future."""
    return asyncio.ensure_future(finish_exchange(
        asyncio.ensure_future(gw.dispatcher.open(call)), gw.config.max_body_bytes))
