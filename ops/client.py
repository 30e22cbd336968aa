"""The CLI's HTTP client of the gateway: API errors become ThawError with the
server's message, so every command fails with one readable line."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from thaw.core.errors import ThawError, Unauthenticated, Unavailable
from thaw.ops.credentials import DEFAULT_URL, credentials

# Deploys wait for the snapshot build; a large model's setup() can take minutes.
DEPLOY_TIMEOUT = 1800.0


def api_key() -> str:
    """THAW_API_KEY, else the config file, else thaw up's dev key (ops/credentials.py)."""
    return credentials().key


def gateway_url() -> str:
    """THAW_URL, else the config file, else DEFAULT_URL (ops/credentials.py)."""
    if os.environ.get("THAW_URL", "").strip() and not os.environ.get("THAW_PROFILE"):
        return os.environ["THAW_URL"].strip().rstrip("/")
    try:
        return credentials().url
    except Unauthenticated:
        return DEFAULT_URL


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

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A response whose body is read as it arrives; errors as in `request`."""
        headers = {**self._headers(), **kwargs.pop("headers", {})}
        try:
            with self._http.stream(method, path, headers=headers, **kwargs) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise ThawError(f"{resp.status_code}: {_error_message(resp)}")
                yield resp
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach the gateway at {self.url}: {exc}") from exc

    def deploy(self, bundle: bytes, wait: bool = True) -> dict[str, Any]:
        resp = self.request("POST", "/v1/functions", params={"wait": str(wait).lower()},
                            content=bundle, headers={"Content-Type": "application/gzip"},
                            timeout=DEPLOY_TIMEOUT)
        result: dict[str, Any] = resp.json()
        return result


def _error_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:500] or resp.reason_phrase


def read_bundle_dir(path: Path) -> bytes:
    from thaw.core.spec import pack_bundle, read_bundle

    if not (path / "thaw.toml").exists():
        raise ThawError(f"{path} has no thaw.toml")
    data = pack_bundle(str(path))
    read_bundle(data)  # fail here, with the key at fault, before uploading
    return data
