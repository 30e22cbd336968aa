"""Image archives over HTTP: what `thaw deploy image.tar` uploads before its bundle.

- `PUT /v1/images/{image_id}` (scope `deploy`): the body is a `docker save` archive
  (plain or gzip'd) holding image `image_id` (`sha256:<hex>`, its config's digest).
  It is streamed to the scheduler as it arrives, never held whole: it needs a
  Content-Length, at most the gateway's max_image_archive_bytes (413 naming it, before
  a byte is read), and must arrive within body_timeout_seconds between reads and
  body_deadline_seconds in all (408). The scheduler keeps it only when the archive
  holds that very image (scheduler/images.py; 400 naming what is wrong otherwise).
- `GET /v1/images/{image_id}`: whether this tenant has uploaded it (`stored`), so the
  CLI sends an archive once.

Nodes fetch a stored archive from the scheduler and `docker load` it when they first
start the image (platform/image_load.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from thaw.core.errors import InvalidArgument
from thaw.core.grpcutil import call
from thaw.core.image_archive import image_hex
from thaw.core.units import format_size
from thaw.gateway.auth import require
from thaw.gateway.caller import principal_of
from thaw.gateway.errors import PayloadTooLarge
from thaw.gateway.openapi import _errors, _json
from thaw.gateway.request import BodyClock
from thaw.gateway.state import CONFIG_KEY, GATEWAY_KEY
from thaw.proto import images_pb2, images_pb2_grpc

# The scheduler checks a stored archive by reading it again (its index and config):
# seconds for a large one, on top of the upload itself.
UPLOAD_TIMEOUT = 3600.0
LOOKUP_TIMEOUT = 30.0
# Pieces sent to the scheduler stay well below gRPC's 4 MiB message limit.
PIECE_BYTES = 1024 * 1024
ARCHIVE_TYPES = ("application/x-tar", "application/gzip", "application/octet-stream")


def _stub(request: web.Request) -> images_pb2_grpc.ImagesStub:
    return images_pb2_grpc.ImagesStub(request.app[GATEWAY_KEY].scheduler.channel)


def _image_id(request: web.Request) -> str:
    image_id = request.match_info["image_id"]
    image_hex(image_id)  # 400 naming image_id
    return image_id


def archive_too_large(limit: int, size: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the image archive is {format_size(size)}, larger than the "
                           f"{format_size(limit)} one upload may be (the gateway's "
                           "max_image_archive_bytes)", field="archive")


async def put_image(request: web.Request) -> web.Response:
    p = await principal_of(request)
    require(p, "deploy")
    image_id = _image_id(request)
    limit = request.app[CONFIG_KEY].max_image_archive_bytes
    length = request.content_length
    if length is None:
        raise InvalidArgument("send the archive with a Content-Length (its size is "
                              "checked before it is read)", field="Content-Length")
    if length > limit:
        raise archive_too_large(limit, length)
    if length == 0:
        raise InvalidArgument("send the image archive (`docker save IMAGE`) as the body",
                              field="archive")
    clock = BodyClock(request.app)
    # An error raised while reading the body is the client's (408): kept here, since
    # gRPC turns any error of the request stream into a cancelled call.
    failed: list[BaseException] = []

    async def pieces() -> AsyncIterator[images_pb2.ImageUploadPiece]:
        yield images_pb2.ImageUploadPiece(tenant=p.tenant, image_id=image_id,
                                          size=length, max_bytes=limit)
        try:
            while chunk := await clock.next(request.content.readany, "the image archive"):
                for start in range(0, len(chunk), PIECE_BYTES):
                    yield images_pb2.ImageUploadPiece(data=chunk[start:start + PIECE_BYTES])
        except BaseException as exc:
            failed.append(exc)
            raise

    try:
        stored = await call(_stub(request).Upload(pieces(), timeout=UPLOAD_TIMEOUT))
    except Exception:
        if failed:
            raise failed[0] from None
        raise
    return web.json_response({"image_id": stored.image_id, "size": stored.size,
                              "existed": stored.existed}, status=200 if stored.existed
                             else 201)


async def get_image(request: web.Request) -> web.Response:
    p = await principal_of(request)
    require(p, "deploy")
    image_id = _image_id(request)
    info = await call(_stub(request).Lookup(
        images_pb2.ImageRequest(image_id=image_id, tenant=p.tenant), timeout=LOOKUP_TIMEOUT))
    return web.json_response({"image_id": image_id, "stored": info.stored,
                              "size": info.size if info.stored else None})


def add_routes(app: web.Application) -> None:
    app.router.add_put("/v1/images/{image_id}", put_image)
    app.router.add_get("/v1/images/{image_id}", get_image)


_ID_PARAM: dict[str, Any] = {
    "name": "image_id", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}}
_STORED = {"type": "object", "properties": {
    "image_id": {"type": "string"}, "size": {"type": "integer"},
    "existed": {"type": "boolean"}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/v1/images/{image_id}": {
        "put": {
            "summary": "Upload a `docker save` archive (plain or gzip'd) of image "
                       "`image_id` for image functions; nodes load it when they need it.",
            "description": "Needs Content-Length, at most the gateway's "
                           "max_image_archive_bytes (413), arriving within "
                           "body_deadline_seconds (408). The archive must hold exactly "
                           "that image: its config must hash to the id (400 otherwise).",
            "parameters": [_ID_PARAM],
            "requestBody": {"required": True, "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in ARCHIVE_TYPES}},
            "responses": {
                "201": _json(_STORED, "Stored."),
                "200": _json(_STORED, "This archive was stored already; kept as it was."),
                **_errors(400, 401, 403, 413, 503)}},
        "get": {
            "summary": "Whether this tenant has uploaded the archive of `image_id`.",
            "parameters": [_ID_PARAM],
            "responses": {"200": _json({"type": "object", "properties": {
                "image_id": {"type": "string"}, "stored": {"type": "boolean"},
                "size": {"type": ["integer", "null"]}}}, "Stored or not."),
                **_errors(400, 401, 403, 503)}}},
}
