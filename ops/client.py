"""The CLI's client of the gateway: thaw.client's Client (one HTTP client in the
project), with the credentials the CLI reads. API errors are thaw.client's typed
errors (ThawError subclasses), so every command fails with one readable line."""

from __future__ import annotations

from pathlib import Path

from thaw.client import Client as _Client
from thaw.client.credentials import credentials
from thaw.client.credentials import gateway_url as gateway_url
from thaw.client.protocol import DEPLOY_TIMEOUT as DEPLOY_TIMEOUT
from thaw.core.errors import ThawError


def api_key() -> str:
    """THAW_API_KEY, else the config file, else thaw up's dev key (thaw.client.credentials)."""
    return credentials().key


class Client(_Client):
    """thaw.client.Client with the CLI's positional signature (url, key, timeout)."""

    def __init__(self, url: str | None = None, key: str | None = None,
                 timeout: float = 60.0) -> None:
        super().__init__(url, key, timeout=timeout)


def read_bundle_dir(path: Path) -> bytes:
    from thaw.core.spec import pack_bundle, read_bundle

    if not (path / "thaw.toml").exists():
        raise ThawError(f"{path} has no thaw.toml")
    data = pack_bundle(str(path))
    read_bundle(data)  # fail here, with the key at fault, before uploading
    return data
