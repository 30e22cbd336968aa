"""Where a client finds the gateway and the API key; the `thaw` CLI reads them here too.

Order, first found wins (each of url and key on its own):
1. THAW_URL / THAW_API_KEY in the environment;
2. the config file ($THAW_CONFIG_FILE, else ~/.config/thaw/config.toml): `url` and
   `api_key` at the top, or under `[profiles.<name>]` with THAW_PROFILE (`thaw
   --profile <name>`);
3. what `thaw up` wrote in $THAW_HOME (default ./.thaw): its development key (dev-key)
   and its API URL (dev-url, so `thaw up --port P` is remembered), else
   http://127.0.0.1:8000.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from thaw.core.errors import InvalidArgument, Unauthenticated

DEFAULT_URL = "http://127.0.0.1:8000"
# Files `thaw up` writes in its home folder.
DEV_KEY_FILE = "dev-key"
DEV_URL_FILE = "dev-url"


def thaw_home() -> Path:
    """$THAW_HOME, else ./.thaw (as `thaw up` resolves it)."""
    return Path(os.environ.get("THAW_HOME", ".thaw")).resolve()


def config_path() -> Path:
    given = os.environ.get("THAW_CONFIG_FILE", "").strip()
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME", "").strip() or str(Path.home() / ".config")
    return Path(base) / "thaw" / "config.toml"


def read_config(path: Path | None = None) -> dict[str, Any]:
    path = path or config_path()
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"cannot read the config file {path}: {exc}",
                              field="config") from exc


def _section(config: dict[str, Any], profile: str) -> dict[str, Any]:
    if not profile:
        return config
    profiles = config.get("profiles", {})
    if not isinstance(profiles, dict) or profile not in profiles:
        raise InvalidArgument(f"no profile {profile!r} in {config_path()}", field="profile")
    section = profiles[profile]
    if not isinstance(section, dict):
        raise InvalidArgument(f"profiles.{profile} in {config_path()} is not a table",
                              field="profile")
    return section


def _dev_file(name: str) -> str:
    path = thaw_home() / name
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return ""


@dataclass(frozen=True)
class Credentials:
    url: str
    key: str


def _found() -> tuple[str, str]:
    profile = os.environ.get("THAW_PROFILE", "").strip()
    url = os.environ.get("THAW_URL", "").strip()
    key = os.environ.get("THAW_API_KEY", "").strip()
    if not (url and key) or profile:
        section = _section(read_config(), profile)
        url = url or str(section.get("url", "")).strip()
        key = key or str(section.get("api_key", "")).strip()
    if not key:
        key = _dev_file(DEV_KEY_FILE)
        url = url or _dev_file(DEV_URL_FILE)
    return (url or DEFAULT_URL).rstrip("/"), key


def credentials() -> Credentials:
    """The gateway URL and API key, by the order in the module docstring."""
    url, key = _found()
    if not key:
        raise Unauthenticated("no API key: set THAW_API_KEY or run `thaw login` "
                              "(thaw up prints the dev key)")
    return Credentials(url, key)


def gateway_url() -> str:
    """The gateway URL by the same order, even where no key is found yet."""
    if os.environ.get("THAW_URL", "").strip() and not os.environ.get("THAW_PROFILE"):
        return os.environ["THAW_URL"].strip().rstrip("/")
    return _found()[0]
