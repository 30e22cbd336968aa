"""Stored invocations as the client sees them: their JSON, the 202/303 that points
to them, and a stored result answered as the function gave it."""

from __future__ import annotations

import base64
from typing import Any

from aiohttp import web

from thaw.gateway import jsonbody, tracing
from thaw.gateway.errors import InvocationCancelled, InvocationExpired
from thaw.gateway.request import INVOCATION_HEADER
from thaw.gateway.stored.result_files import Links, is_refs
from thaw.proto import invocations_pb2

# Results up to this size are inlined in GET /v1/invocations/{id}; larger ones only
# through the result URL.
INLINE_RESULT_BYTES = 1024 * 1024
JSON_TYPES = ("application/json", "application/problem+json")


def invocation_url(invocation_id: str) -> str:
    return f"/v1/invocations/{invocation_id}"


def _time(value: float) -> float | None:
    return value or None


def _trace_id(headers_json: str) -> str:
    try:
        headers = jsonbody.loads(headers_json or "{}")
    except ValueError:
        return ""
    return tracing.trace_id_of(headers) if isinstance(headers, dict) else ""


def invocation_json(inv: invocations_pb2.Invocation, links: Links | None = None
                    ) -> dict[str, Any]:
    """An invocation as JSON; a result whose files are stored gives them as URLs
    `links` mints now (result_files.py)."""
    out: dict[str, Any] = {
        "id": inv.id, "function": inv.function, "status": inv.state,
        "priority": inv.priority, "url": invocation_url(inv.id),
        "result_url": invocation_url(inv.id) + "/result",
        "created_at": inv.created_at, "started_at": _time(inv.started_at),
        "finished_at": _time(inv.finished_at), "expires_at": _time(inv.expires_at),
        "timings": {
            "queued_seconds": round((inv.started_at or inv.finished_at or inv.created_at)
                                    - inv.created_at, 6),
            "run_seconds": round(inv.finished_at - inv.started_at, 6)
            if inv.finished_at and inv.started_at else None},
        "start": inv.start or None,
        # Who made it: a client's call, or a cron schedule (docs/schedules.md).
        "source": inv.source or "call", "schedule_id": inv.schedule_id or None,
        # The trace the call began, its run's spans in it (docs/tracing.md).
        "trace_id": _trace_id(inv.headers_json) or None,
    }
    if inv.idempotency_key:
        out["idempotency_key"] = inv.idempotency_key
    if inv.error_code:
        out["error"] = {"code": inv.error_code, "message": inv.error_message}
    if inv.webhook_url:
        out["webhook"] = {"url": inv.webhook_url, "state": inv.webhook_state or "waiting",
                          "attempts": inv.webhook_attempts,
                          "last_status": inv.webhook_last_status or None,
                          "last_attempt_at": _time(inv.webhook_last_at),
                          "next_attempt_at": _time(inv.webhook_next_at)
                          if inv.webhook_state == "pending" else None,
                          "error": inv.webhook_error or None}
    if inv.state in ("succeeded", "failed"):
        out["result_status"] = inv.result_status
        out["result_content_type"] = inv.result_content_type
        out["result_bytes"] = inv.result_bytes
        refs = is_refs(inv.result_content_type)
        if refs:  # answered as JSON with URLs (by the result route too)
            out["result_content_type"] = "application/json"
        if inv.result_body and inv.result_bytes <= INLINE_RESULT_BYTES:
            if not refs:
                inline_result(out, inv.result_content_type, inv.result_body)
            elif links is not None:
                out["result"] = links.value(inv.tenant, inv.result_body)
    return out


def inline_result(out: dict[str, Any], content_type: str, body: bytes) -> None:
    if content_type.split(";")[0].strip().lower() in JSON_TYPES:
        try:
            out["result"] = jsonbody.loads(body)
            return
        except ValueError:
            pass
    out["result_base64"] = base64.b64encode(body).decode()


def accepted(inv: invocations_pb2.Invocation, status: int = 202) -> web.Response:
    """202 (async) or 303 (sync past the wait limit: see the result URL)."""
    url = invocation_url(inv.id)
    body = {"id": inv.id, "status": inv.state, "url": url, "result_url": url + "/result"}
    location = url if status == 202 else url + "/result"
    return web.json_response(body, status=status, headers={
        "Location": location, INVOCATION_HEADER: inv.id})


def stored_answer(inv: invocations_pb2.Invocation, links: Links | None = None
                  ) -> web.Response:
    """An invocation's stored result, as the function answered it (its files as
    URLs `links` mints now)."""
    if inv.state == "cancelled":
        raise InvocationCancelled(f"invocation {inv.id} was cancelled; it has no result",
                                  field="id")
    if inv.state == "expired":
        raise expired(inv.id)
    headers = {INVOCATION_HEADER: inv.id}
    if inv.start:
        headers["X-Thaw-Start"] = inv.start
    return result_response(inv.tenant, inv.result_status, inv.result_content_type,
                           inv.result_body, headers, links)


def result_response(tenant: str, status: int, content_type: str, body: bytes,
                    headers: dict[str, str], links: Links | None) -> web.Response:
    """A stored (or just stored) result as the function answered it, `headers` added;
    stored files (FILE_REFS_TYPE) as JSON with their URLs."""
    if links is not None and is_refs(content_type):
        return links.response(tenant, status, body, headers)
    if content_type:
        headers = {**headers, "Content-Type": content_type}
    return web.Response(status=status or 200, body=body, headers=headers)


def expired(invocation_id: str) -> InvocationExpired:
    return InvocationExpired(f"invocation {invocation_id} has expired: its result was "
                             "kept for result_ttl_seconds and then deleted", field="id")
