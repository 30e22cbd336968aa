"""Tenants and keys for the tenancy tests, made through the API with the operator's
(dev) key, each with a fresh name so tests sharing the session's platform never meet."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import EXAMPLES, RunningPlatform, bundle


@dataclass
class TenantKeys:
    tenant: str
    key: str
    key_id: str
    http: httpx.Client


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def new_tenant(platform: RunningPlatform, scopes: tuple[str, ...] = ("admin",),
               **quota: object) -> TenantKeys:
    tenant = unique("t")
    resp = platform.http.post("/v1/tenants", json={"id": tenant, **quota})
    assert resp.status_code == 201, resp.text
    made = platform.http.post("/v1/keys", json={"tenant": tenant, "name": "test",
                                                "scopes": list(scopes)})
    assert made.status_code == 201, made.text
    body = made.json()
    http = httpx.Client(base_url=platform.url, timeout=120,
                        headers={"Authorization": f"Bearer {body['key']}"})
    return TenantKeys(tenant, body["key"], body["id"], http)


def echo_bundle(tmp: Path, name: str, gpu_memory: str = "0") -> Path:
    """examples/echo under another name (and slice size)."""
    folder = tmp / name
    shutil.copytree(EXAMPLES / "echo", folder)
    toml = (folder / "thaw.toml").read_text()
    toml = toml.replace('name = "echo"', f'name = "{name}"')
    toml = toml.replace("gpu_memory = 0", f'gpu_memory = "{gpu_memory}"')
    (folder / "thaw.toml").write_text(toml)
    return folder


def deploy(http: httpx.Client, folder: Path) -> httpx.Response:
    return http.post("/v1/functions", params={"wait": "true"}, content=bundle(folder),
                     headers={"Content-Type": "application/gzip"}, timeout=600)
