"""The tenant's webhook signing secret: `GET /v1/webhooks/secret` (made on first use)
and `POST /v1/webhooks/secret/rotate` (`thaw webhook secret [--rotate]`). A tenant's
admin key only: whoever holds the secret can forge deliveries to the tenant's
receivers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from thaw.gateway.auth import require
from thaw.gateway.caller import principal_of
from thaw.gateway.stored.runner import RUNNER_KEY
from thaw.gateway.stored.signing import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from thaw.proto import invocations_pb2


def secret_json(found: invocations_pb2.WebhookSecret) -> dict[str, Any]:
    return {"tenant": found.tenant, "secret": found.secret, "created_at": found.created_at,
            "previous_secret_until": found.previous_until or None,
            "scheme": "Standard Webhooks v1 (HMAC-SHA256)",
            "headers": [ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER]}


async def _secret(request: web.Request, rotate: bool) -> web.Response:
    p = await principal_of(request)
    require(p, "admin")
    found = await request.app[RUNNER_KEY].client.webhook_secret(p.tenant, rotate=rotate)
    return web.json_response(secret_json(found), headers={"Cache-Control": "no-store"})


async def get_webhook_secret(request: web.Request) -> web.Response:
    return await _secret(request, rotate=False)


async def rotate_webhook_secret(request: web.Request) -> web.Response:
    return await _secret(request, rotate=True)


def add_signing_routes(app: web.Application) -> None:
    app.router.add_get("/v1/webhooks/secret", get_webhook_secret)
    app.router.add_post("/v1/webhooks/secret/rotate", rotate_webhook_secret)


_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
SECRET_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "tenant": {"type": "string"},
    "secret": {"type": "string", "description": "whsec_<base64>: the HMAC key is the "
                                                "base64-decoded part."},
    "created_at": {"type": "number"},
    "previous_secret_until": {"type": ["number", "null"], "description":
                              "After a rotation the previous secret signs too until "
                              "then (a second v1 signature)."},
    "scheme": {"type": "string"}, "headers": {"type": "array", "items": {"type": "string"}}}}
_RESPONSES = {
    "200": {"description": "The secret.", "content": {"application/json": {
        "schema": SECRET_SCHEMA}}},
    "401": {"description": "No API key, or an unknown one.", **_ERROR},
    "403": {"description": "Not an admin key of the tenant.", **_ERROR}}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/webhooks/secret": {"get": {
        "summary": "The tenant's webhook signing secret (Standard Webhooks), made on "
                   "first use; every webhook delivery is signed with it.",
        "responses": _RESPONSES}},
    "/v1/webhooks/secret/rotate": {"post": {
        "summary": "A new webhook signing secret; the previous one keeps signing beside "
                   "it for a day.",
        "responses": _RESPONSES}},
}
