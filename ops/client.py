"""The CLI's HTTP client of the gateway: API errors become ThawError with the
server's message, so every command fails with one readable line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from thaw.core.config import default_home
from thaw.core.errors import ThawError, Unauthenticated, Unavailable

DEFAULT_URL = "http://127.0.0.1:8000"
# Deploys wait for the snapshot build; a large model's setup() can take minutes.
DEPLOY_TIMEOUT = 1800.0


def api_key() -> str:
    key = os.environ.get("THAW_API_KEY", "").strip()
    if not key:
        path = default_home() / "dev-key"
        if path.exists():
            key = path.read_text().strip()
    if not key:
        raise Unauthenticated("no API key: set THAW_API_KEY (thaw up prints the dev key)")
    return key


def gateway_url() -> str:
    return os.environ.get("THAW_URL", DEFAULT_URL).rstrip("/")


class Client:
    def __init__(self, url: str | None = None, key: str | None = None,
                 timeout: float = 60.0) -> None:
        self.url = (url or gateway_url()).rstrip("/")
        self._key = key
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key or api_key()}"}

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self._headers(), **kwargs.pop("headers", {})}
        try:
            resp = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach the gateway at {self.url}: {exc}") from exc
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                message = err["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:500] or resp.reason_phrase
            raise ThawError(f"{resp.status_code}: {message}")
        return resp

    def deploy(self, bundle: bytes, wait: bool = True) -> dict[str, Any]:
        resp = self.request("POST", "/v1/functions", params={"wait": str(wait).lower()},
                            content=bundle, headers={"Content-Type": "application/gzip"},
                            timeout=DEPLOY_TIMEOUT)
        result: dict[str, Any] = resp.json()
        return result


def read_bundle_dir(path: Path) -> bytes:
    from thaw.core.spec import pack_bundle, read_bundle

    if not (path / "thaw.toml").exists():
        raise ThawError(f"{path} has no thaw.toml")
    data = pack_bundle(str(path))
    read_bundle(data)  # fail here, with the key at fault, before uploading
    return data
