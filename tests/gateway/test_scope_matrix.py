"""The scope matrix: every route of the served OpenAPI document, with no key, an
invoke-only key, a deploy-only key, a tenant's admin key and the operator's key. Each
route's row says the least it needs (ROUTES; a route added later fails this test until
it is classified). A caller below that is refused (401 without a key, 403 with one);
a caller at or above it is not (whatever the route then says about the request: the
requests name things that do not exist, so nothing is changed).
"""

from __future__ import annotations

import re
import time

import httpx

from tests.conftest import RunningPlatform
from tests.gateway.tenancy_helpers import new_tenant, unique
from thaw.gateway.filestore import KEY_FILE, FileSigner

# The least each route needs: public < any key of the tenant < invoke | deploy < admin
# < operator (invoke and deploy are apart: neither implies the other).
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/"): "public", ("GET", "/healthz"): "public", ("GET", "/readyz"): "public",
    ("GET", "/openapi.json"): "public", ("GET", "/static/{file}"): "public",
    ("GET", "/v1/schema/thaw.toml"): "public",
    ("GET", "/metrics"): "operator",
    ("POST", "/v1/functions"): "deploy", ("GET", "/v1/functions"): "any",
    ("GET", "/v1/functions/{name}"): "any", ("DELETE", "/v1/functions/{name}"): "deploy",
    ("PATCH", "/v1/functions/{name}"): "deploy",
    ("POST", "/v1/functions/{name}/prewarm"): "deploy",
    ("POST", "/v1/functions/{name}/evict"): "deploy",
    ("GET", "/v1/nodes"): "operator", ("GET", "/v1/events"): "operator",
    ("POST", "/v1/nodes/{node}/{action}"): "operator",
    ("GET", "/v1/models"): "invoke", ("GET", "/v1/models/{model}"): "invoke",
    ("POST", "/v1/chat/completions"): "invoke", ("POST", "/v1/completions"): "invoke",
    ("POST", "/v1/embeddings"): "invoke",
    ("POST", "/fn/{tenant}/{name}"): "invoke", ("POST", "/fn/{tenant}/{name}/{path}"): "invoke",
    ("GET", "/fn/{tenant}/{name}/openapi.json"): "invoke",
    ("GET", "/fn/{tenant}/{name}/docs"): "invoke",
    # Stored invocations: any key (an invoke-only key sees its own only).
    ("GET", "/v1/invocations"): "any", ("GET", "/v1/invocations/{id}"): "any",
    ("GET", "/v1/invocations/{id}/result"): "any",
    ("POST", "/v1/invocations/{id}/cancel"): "any",
    ("POST", "/v1/invocations/{id}/priority"): "admin",
    # Cron schedules with their last runs (gateway/schedules.py), as a function's record.
    ("GET", "/v1/schedules"): "any",
    # The webhook signing secret: whoever holds it can forge deliveries.
    ("GET", "/v1/webhooks/secret"): "admin", ("POST", "/v1/webhooks/secret/rotate"): "admin",
    ("POST", "/v1/tenants"): "operator", ("GET", "/v1/tenants"): "operator",
    ("PUT", "/v1/tenants/{tenant}/quota"): "operator",
    ("PUT", "/v1/tenants/{tenant}/budgets"): "operator",
    ("POST", "/v1/keys"): "admin", ("GET", "/v1/keys"): "admin",
    ("DELETE", "/v1/keys/{id}"): "admin", ("GET", "/v1/audit"): "admin",
    ("GET", "/v1/usage"): "deploy", ("GET", "/v1/functions/{name}/logs"): "deploy",
    ("GET", "/v1/invocations/{id}/logs"): "deploy",  # a call's logs, as a function's
    # Calls' traces hold what handlers put in their spans: the logs' scopes.
    ("GET", "/v1/traces"): "deploy", ("GET", "/v1/traces/{trace_id}"): "deploy",
    ("GET", "/v1/snapshots"): "deploy", ("GET", "/v1/snapshots/{name}"): "deploy",
    ("POST", "/v1/functions/{name}/verify"): "deploy",
    ("POST", "/v1/nodes/{node}/drain"): "operator",
    ("POST", "/v1/nodes/gc"): "operator",
    ("POST", "/v1/nodes/{node}/gc"): "operator",
    ("GET", "/v1/alerts"): "operator",
    ("GET", "/v1/functions/{name}/versions"): "deploy",
    ("POST", "/v1/functions/{name}/rollback"): "deploy",
    ("GET", "/v1/live"): "public",  # a WebSocket: the key is its first message
    # Volumes and chunked uploads (gateway/volumes.py).
    ("POST", "/v1/blobs/missing"): "deploy", ("PUT", "/v1/blobs/{digest}"): "deploy",
    ("POST", "/v1/volumes"): "deploy", ("GET", "/v1/volumes"): "any",
    ("GET", "/v1/volumes/{name}"): "any", ("DELETE", "/v1/volumes/{name}"): "deploy",
    ("POST", "/v1/volumes/{name}/commit"): "deploy",
    ("POST", "/v1/functions/chunked"): "deploy", ("GET", "/v1/storage"): "any",
    ("PUT", "/v1/tenants/{tenant}/storage-quota"): "operator",
    # Secrets (gateway/secrets.py): values go in, names come out.
    ("PUT", "/v1/secrets/{name}"): "deploy", ("GET", "/v1/secrets"): "deploy",
    ("DELETE", "/v1/secrets/{name}"): "deploy",
    # Image archives (gateway/images.py).
    ("PUT", "/v1/images/{image_id}"): "deploy", ("GET", "/v1/images/{image_id}"): "deploy",
    # The nodes' per-function Python environments.
    ("GET", "/v1/nodes/environments"): "operator",
    ("POST", "/v1/nodes/environments/gc"): "operator",
    # Open Inference v2 (gateway/oip.py): health public, models as /v1/models.
    ("GET", "/v2"): "public", ("GET", "/v2/health/live"): "public",
    ("GET", "/v2/health/ready"): "public",
    ("GET", "/v2/models/{name}"): "invoke", ("GET", "/v2/models/{name}/ready"): "invoke",
    ("POST", "/v2/models/{name}/infer"): "invoke",
    ("GET", "/v2/models/{name}/versions/{version}"): "invoke",
    ("GET", "/v2/models/{name}/versions/{version}/ready"): "invoke",
    ("POST", "/v2/models/{name}/versions/{version}/infer"): "invoke",
    # cog/Replicate predictions (gateway/predictions.py): calls, and stored invocations.
    ("POST", "/fn/{tenant}/{name}/predictions"): "invoke",
    ("POST", "/v1/models/{tenant}/{name}/predictions"): "invoke",
    ("GET", "/v1/predictions/{id}"): "any", ("POST", "/v1/predictions/{id}/cancel"): "any",
    ("GET", "/v1/predictions/{id}/stream"): "any",
    # The MCP server (gateway/mcp.py): its tools are calls.
    ("POST", "/mcp"): "invoke",
    # Every method of a function's URL is a call (gateway/invoke.py).
    **{(method, path): "invoke" for method in ("GET", "PUT", "PATCH", "DELETE")
       for path in ("/fn/{tenant}/{name}", "/fn/{tenant}/{name}/{path}")},
    # A function's output file: the signed URL is the permission (gateway/files.py).
    ("GET", "/files/{token}"): "public",
    ("GET", "/livez"): "public",
}
# Which callers each requirement admits.
ADMITS = {"public": {"none", "invoke", "deploy", "admin", "operator"},
          "any": {"invoke", "deploy", "admin", "operator"},
          "invoke": {"invoke", "admin", "operator"},
          "deploy": {"deploy", "admin", "operator"},
          "admin": {"admin", "operator"}, "operator": {"operator"}}
PARAM = re.compile(r"\{(\w+)\}")


def _url(path: str, tenant: str, token: str = "") -> str:
    """The path with parameters naming things that do not exist (the caller's own
    tenant for a function URL, so only the scope decides; a file URL's token signed
    by the platform, so only its being public decides)."""
    values = {"name": unique("nothing"), "model": unique("nothing"), "path": "x",
              "node": unique("node"), "action": "cordon", "file": "dashboard.js",
              "tenant": tenant if path.startswith("/fn/") else unique("nobody"),
              "id": ("inv_" + "0" * 32) if "/invocations/" in path or "/predictions/" in path
              else unique("key"),
              "trace_id": "0" * 32, "digest": "0" * 64, "image_id": "sha256:" + "0" * 64,
              "token": token,
              "version": "1"}
    return PARAM.sub(lambda m: values[m.group(1)], path)


def test_every_route_admits_exactly_the_scopes_it_needs(platform: RunningPlatform) -> None:
    document = platform.http.get("/openapi.json").json()
    served = {(method.upper(), path) for path, item in document["paths"].items()
              for method in item if method in ("get", "post", "put", "patch", "delete")}
    assert served == set(ROUTES), (
        f"classify the new routes: {sorted(served - set(ROUTES))}; "
        f"gone: {sorted(set(ROUTES) - served)}")
    admin = new_tenant(platform)
    callers: dict[str, httpx.Client] = {
        "none": httpx.Client(base_url=platform.url, timeout=60),
        "admin": admin.http, "operator": platform.http}
    for scope in ("invoke", "deploy"):
        made = admin.http.post("/v1/keys", json={"name": scope, "scopes": [scope]})
        assert made.status_code == 201, made.text
        callers[scope] = httpx.Client(base_url=platform.url, timeout=60, headers={
            "Authorization": f"Bearer {made.json()['key']}"})
    key_file = next(platform.platform.home.rglob(f"files/{KEY_FILE}"))
    token = FileSigner(key_file.read_bytes()).sign("dev", "0" * 64, int(time.time()) + 600)
    failures, checked = [], 0
    for (method, path), needs in sorted(ROUTES.items()):
        if path == "/v1/live":
            continue  # tests/gateway/test_dashboard_live.py
        for who, http in callers.items():
            tenant = "dev" if who == "operator" else admin.tenant
            body = {} if method in ("POST", "PUT", "PATCH") else None
            resp = http.request(method, _url(path, tenant, token), json=body)
            checked += 1
            allowed = who in ADMITS[needs]
            expected = "not 401/403" if allowed else ("401" if who == "none" else "403")
            ok = (resp.status_code not in (401, 403)) if allowed else (
                resp.status_code == (401 if who == "none" else 403))
            if not ok or resp.status_code >= 500:
                failures.append(f"{method} {path} as {who} (needs {needs}): "
                                f"{resp.status_code}, expected {expected}: {resp.text[:200]}")
    for http in callers.values():
        if http is not platform.http:
            http.close()
    assert not failures, f"{len(failures)} of {checked}:\n" + "\n".join(failures)
