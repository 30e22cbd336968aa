"""Model volumes, content-addressed chunks and bundles deployed from chunks, over HTTP
(the scheduler's Volumes service of proto/volumes.proto stores them; docs/volumes.md).

- `POST /v1/blobs/missing` {"digests": [...]}: which of these chunks the caller's
  tenant lacks (asked per tenant: nothing about other tenants' chunks is told).
- `PUT /v1/blobs/{sha256}`: one chunk (at most MAX_CHUNK_BYTES), checked against its
  digest (400 on a mismatch), counted against the tenant's max_storage_bytes (507).
- `POST/GET /v1/volumes`, `GET/DELETE /v1/volumes/{name}`,
  `POST /v1/volumes/{name}/commit` {"files": [{path, size, mode, chunks}]}.
- `POST /v1/functions/chunked` {"chunks", "sha256", "size"}: deploy a bundle whose
  chunks were uploaded (a bundle past the single-request cap), up to the tenant's
  max_bundle_bytes.
- `GET /v1/storage`: the tenant's bytes stored and limits;
  `PUT /v1/tenants/{tenant}/storage-quota`: the operator sets them.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from thaw.core.errors import InvalidArgument
from thaw.core.grpcutil import call
from thaw.core.units import parse_size
from thaw.gateway.auth import require, require_operator
from thaw.gateway.caller import principal_of
from thaw.gateway.openapi import JSON, NAME, _errors, _json
from thaw.gateway.request import read_body
from thaw.gateway.state import CONFIG_KEY, GATEWAY_KEY
from thaw.gateway.views import function_json
from thaw.proto import volumes_pb2, volumes_pb2_grpc

# Kept equal to scheduler/blobs.py's MAX_CHUNK_BYTES (what the scheduler stores) and
# at least ops/uploads.py's CHUNK_BYTES (what the CLI sends).
MAX_CHUNK_BYTES = 8 * 1024 * 1024
META_TIMEOUT = 30.0
CHUNK_TIMEOUT = 120.0
# A chunked deploy reassembles and reads the bundle, and may wait for its build.
DEPLOY_TIMEOUT = 1800.0
LIMIT_MAX = 2**63 - 1


def _stub(request: web.Request) -> volumes_pb2_grpc.VolumesStub:
    return volumes_pb2_grpc.VolumesStub(request.app[GATEWAY_KEY].scheduler.channel)


async def _object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError as exc:
        raise InvalidArgument("the body must be a JSON object", field="body") from exc
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object", field="body")
    return body


def _strings(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{key} must be a list of strings", field=key)
    return value


def _int(body: dict[str, Any], key: str, field: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= LIMIT_MAX:
        raise InvalidArgument(f"{field} must be a non-negative integer", field=field)
    return value


def volume_json(v: volumes_pb2.VolumeInfo) -> dict[str, Any]:
    return {"name": v.name, "manifest_digest": v.manifest_digest or None, "size": v.size,
            "files": v.files, "created_at": v.created_at, "updated_at": v.updated_at}


def storage_json(s: volumes_pb2.StorageInfo) -> dict[str, Any]:
    return {"tenant": s.tenant, "stored_bytes": s.stored_bytes,
            "max_storage_bytes": s.max_storage_bytes, "max_bundle_bytes": s.max_bundle_bytes}


def _file(raw: object) -> volumes_pb2.VolumeFile:
    if not isinstance(raw, dict):
        raise InvalidArgument("each file is an object {path, size, mode, chunks}",
                              field="files")
    path = raw.get("path")
    if not isinstance(path, str):
        raise InvalidArgument("a file's path must be a string", field="files.path")
    mode = raw.get("mode", 0o644)
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
        raise InvalidArgument("a file's mode must be permission bits", field="files.mode")
    return volumes_pb2.VolumeFile(path=path, size=_int(raw, "size", "files.size"),
                                  mode=mode, chunks=_strings(raw, "chunks"))


async def missing_blobs(request: web.Request) -> web.Response:
    p = await principal_of(request)
    require(p, "deploy")
    digests = _strings(await _object(request), "digests")
    resp = await call(_stub(request).MissingBlobs(volumes_pb2.MissingBlobsRequest(
        tenant=p.tenant, digests=digests), timeout=META_TIMEOUT))
    return web.json_response({"missing": list(resp.digests)})


async def put_blob(request: web.Request) -> web.Response:
    p = await principal_of(request)
    require(p, "deploy")
    data = await read_body(request, MAX_CHUNK_BYTES,
                           f"a chunk's limit of {MAX_CHUNK_BYTES} bytes")
    resp = await call(_stub(request).PutBlob(volumes_pb2.PutBlobRequest(
        tenant=p.tenant, digest=request.match_info["digest"], data=data),
        timeout=CHUNK_TIMEOUT))
    return web.json_response({"digest": resp.digest, "size": resp.size,
                              "stored": resp.stored, "stored_bytes": resp.stored_bytes},
                             status=201 if resp.stored else 200)


async def create_volume(request: web.Request) -> web.Response:
    p = await principal_of(request)
    require(p, "deploy")
    name = (await _object(request)).get("name")
    if not isinstance(name, str):
        raise InvalidArgument("name (the volume's) is required", field="name")
    made = await call(_stub(request).CreateVolume(volumes_pb2.VolumeRequest(
        tenant=p.tenant, name=name), timeout=META_TIMEOUT))
    return web.json_response(volume_json(made), status=201,
                             headers={"Location": f"/v1/volumes/{made.name}"})


async def list_volumes(request: web.Request) -> web.Response:
    p = await principal_of(request)
    resp = await call(_stub(request).ListVolumes(volumes_pb2.ListVolumesRequest(
        tenant=p.tenant), timeout=META_TIMEOUT))
    return web.json_response({"volumes": [volume_json(v) for v in resp.volumes]})


async def get_volume(request: web.Request) -> web.Response:
    p = await principal_of(request)
    detail = await call(_stub(request).GetVolume(volumes_pb2.VolumeRequest(
        tenant=p.tenant, name=request.match_info["name"]), timeout=META_TIMEOUT))
    body = volume_json(detail.info)
    body["contents"] = [{"path": f.path, "size": f.size, "mode": f.mode,
                         "chunks": list(f.chunks)} for f in detail.files]
    return web.json_response(body)


async def delete_volume(request: web.Request) -> web.Response:
    p = await principal_of(request)
    require(p, "deploy")
    await call(_stub(request).DeleteVolume(volumes_pb2.VolumeRequest(
        tenant=p.tenant, name=request.match_info["name"]), timeout=META_TIMEOUT))
    return web.Response(status=204)


async def commit_volume(request: web.Request) -> web.Response:
    p = await principal_of(request)
    require(p, "deploy")
    raw = (await _object(request)).get("files")
    if not isinstance(raw, list):
        raise InvalidArgument("files must be a list", field="files")
    made = await call(_stub(request).CommitVolume(volumes_pb2.CommitVolumeRequest(
        tenant=p.tenant, name=request.match_info["name"], files=[_file(f) for f in raw]),
        timeout=META_TIMEOUT))
    return web.json_response(volume_json(made))


async def deploy_chunked(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    p = await principal_of(request)
    require(p, "deploy")
    body = await _object(request)
    sha256 = body.get("sha256")
    if not isinstance(sha256, str):
        raise InvalidArgument("sha256 (of the whole bundle) is required", field="sha256")
    wait, force = (request.query.get(k, "false").lower() in ("1", "true", "yes")
                   for k in ("wait", "force"))
    fn = await call(_stub(request).CreateFunctionFromBlobs(
        volumes_pb2.CreateFunctionFromBlobsRequest(
            tenant=p.tenant, chunks=_strings(body, "chunks"), sha256=sha256,
            size=_int(body, "size", "size"), wait=wait, force=force),
        timeout=DEPLOY_TIMEOUT))
    body = function_json(request, fn)
    body["unchanged"] = fn.unchanged
    if fn.unchanged:
        # As POST /v1/functions: the bundle it serves already, that version kept.
        return web.json_response(body, status=200)
    gw.leases.forget_function(f"{fn.tenant}/{fn.name}")
    return web.json_response(body, status=201, headers={"Location": f"/v1/functions/{fn.name}"})


async def get_storage(request: web.Request) -> web.Response:
    p = await principal_of(request)
    info = await call(_stub(request).GetStorage(volumes_pb2.StorageRequest(
        tenant=p.tenant), timeout=META_TIMEOUT))
    return web.json_response(storage_json(info))


def _limit(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if value is None:
        return -1
    if isinstance(value, str):
        try:
            value = parse_size(value)
        except ValueError as exc:
            raise InvalidArgument(f"{key}: {exc}", field=key) from exc
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= LIMIT_MAX:
        raise InvalidArgument(f"{key} must be a positive size", field=key)
    return value


async def set_storage_quota(request: web.Request) -> web.Response:
    """Both limits at once: one left out (or null) is the default."""
    require_operator(await principal_of(request), request.app[CONFIG_KEY])
    body = await _object(request)
    unknown = set(body) - {"max_storage_bytes", "max_bundle_bytes"}
    if unknown:
        field = sorted(unknown)[0]
        raise InvalidArgument(f"unknown field {field!r}: a storage quota has "
                              "max_storage_bytes and max_bundle_bytes", field=field)
    info = await call(_stub(request).SetStorageQuota(volumes_pb2.SetStorageQuotaRequest(
        tenant=request.match_info["tenant"],
        max_storage_bytes=_limit(body, "max_storage_bytes"),
        max_bundle_bytes=_limit(body, "max_bundle_bytes")), timeout=META_TIMEOUT))
    return web.json_response(storage_json(info))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/blobs/missing", missing_blobs)
    r.add_put("/v1/blobs/{digest}", put_blob)
    r.add_post("/v1/volumes", create_volume)
    r.add_get("/v1/volumes", list_volumes)
    r.add_get("/v1/volumes/{name}", get_volume)
    r.add_delete("/v1/volumes/{name}", delete_volume)
    r.add_post("/v1/volumes/{name}/commit", commit_volume)
    r.add_post("/v1/functions/chunked", deploy_chunked)
    r.add_get("/v1/storage", get_storage)
    r.add_put("/v1/tenants/{tenant}/storage-quota", set_storage_quota)


_DIGEST = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_VOLUME = {"type": "object", "required": ["name", "size", "files"], "properties": {
    "name": NAME, "manifest_digest": {**_DIGEST, "nullable": True},
    "size": {"type": "integer"}, "files": {"type": "integer"},
    "created_at": {"type": "number"}, "updated_at": {"type": "number"}}}
_FILE = {"type": "object", "required": ["path", "size", "chunks"], "properties": {
    "path": {"type": "string"}, "size": {"type": "integer", "minimum": 0},
    "mode": {"type": "integer"}, "chunks": {"type": "array", "items": _DIGEST}}}
_STORAGE = {"type": "object", "properties": {
    "tenant": {"type": "string"}, "stored_bytes": {"type": "integer"},
    "max_storage_bytes": {"type": "integer"}, "max_bundle_bytes": {"type": "integer"}}}
_LIMIT = {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string"}],
          "nullable": True}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": schema}}}


def _param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/blobs/missing": {"post": {
        "summary": "Which of these chunks the tenant has not stored",
        "requestBody": _body({"type": "object", "required": ["digests"], "properties": {
            "digests": {"type": "array", "items": _DIGEST, "maxItems": 4096}}}),
        "responses": {"200": _json({"type": "object", "properties": {
            "missing": {"type": "array", "items": _DIGEST}}}, "The missing ones."),
            **_errors(400, 401, 403)}}},
    "/v1/blobs/{digest}": {"put": {
        "summary": "Store one chunk (its body; at most 8 MiB), checked against its sha256",
        "parameters": [_param("digest", _DIGEST)],
        "requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"201": _json(_STORAGE, "Stored."),
                      "200": _json(_STORAGE, "The tenant had it already."),
                      "507": _json({"$ref": "#/components/schemas/Error"},
                                   "Past the tenant's max_storage_bytes."),
                      **_errors(400, 401, 403, 413)}}},
    "/v1/volumes": {
        "post": {"summary": "Create an empty volume",
                 "requestBody": _body({"type": "object", "required": ["name"],
                                       "properties": {"name": NAME}}),
                 "responses": {"201": _json(_VOLUME, "Created."),
                               **_errors(400, 401, 403, 409)}},
        "get": {"summary": "The tenant's volumes",
                "responses": {"200": _json({"type": "object", "properties": {
                    "volumes": {"type": "array", "items": _VOLUME}}}, "The volumes."),
                    **_errors(401)}}},
    "/v1/volumes/{name}": {
        "get": {"summary": "A volume and its files", "parameters": [_param("name", NAME)],
                "responses": {"200": _json({**_VOLUME, "properties": {
                    **_VOLUME["properties"],  # type: ignore[dict-item]
                    "contents": {"type": "array", "items": _FILE}}}, "The volume."),
                    **_errors(400, 401, 404)}},
        "delete": {"summary": "Remove a volume no function mounts",
                   "parameters": [_param("name", NAME)],
                   "responses": {"204": {"description": "Removed."},
                                 **_errors(400, 401, 403, 404, 409)}}},
    "/v1/volumes/{name}/commit": {"post": {
        "summary": "Add or replace files (their chunks uploaded) as the volume's new manifest",
        "parameters": [_param("name", NAME)],
        "requestBody": _body({"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": _FILE}}}),
        "responses": {"200": _json(_VOLUME, "The volume as committed."),
                      **_errors(400, 401, 403, 404, 409)}}},
    "/v1/functions/chunked": {"post": {
        "summary": "Deploy a bundle uploaded as chunks (past the single-request cap)",
        "parameters": [{"name": name, "in": "query", "required": False,
                        "schema": {"type": "boolean"}} for name in ("wait", "force")],
        "requestBody": _body({"type": "object", "required": ["chunks", "sha256", "size"],
                              "properties": {"chunks": {"type": "array", "items": _DIGEST},
                                             "sha256": _DIGEST,
                                             "size": {"type": "integer", "minimum": 1}}}),
        "responses": {"201": _json({"$ref": "#/components/schemas/Function"}, "Deployed."),
                      "200": _json({"$ref": "#/components/schemas/Function"},
                                   "The bundle the function serves already: kept."),
                      "404": _json({"$ref": "#/components/schemas/Error"},
                                   "A chunk it names is not stored for the tenant."),
                      **_errors(400, 401, 403, 413, 503)}}},
    "/v1/storage": {"get": {
        "summary": "The tenant's stored bytes and storage limits",
        "responses": {"200": _json(_STORAGE, "Usage and limits."), **_errors(401)}}},
    "/v1/tenants/{tenant}/storage-quota": {"put": {
        "summary": "Set a tenant's storage limits (operator): null or left out = default",
        "parameters": [_param("tenant", NAME)],
        "requestBody": _body({"type": "object", "properties": {
            "max_storage_bytes": _LIMIT, "max_bundle_bytes": _LIMIT}}),
        "responses": {"200": _json(_STORAGE, "The tenant's limits now."),
                      **_errors(400, 401, 403, 404)}}},
}
