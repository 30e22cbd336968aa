"""Where the CLI finds the gateway and the API key (`thaw login`, ops/config.py, saves them).

Order, first found wins (each of url and key on its own):
1. THAW_URL / THAW_API_KEY in the environment;
2. the config file ($THAW_CONFIG_FILE, else ~/.config/thaw/config.toml): `url` and
   `api_key` at the top, or under `[profiles.<name>]` with `--profile <name>`
   (or THAW_PROFILE);
3. the development key `thaw up` writes ($THAW_HOME/dev-key) and http://127.0.0.1:8000.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from thaw.core.config import default_home
from thaw.core.errors import InvalidArgument, Unauthenticated

DEFAULT_URL = "http://127.0.0.1:8000"
# Written with this mode: the file holds an API key.
CONFIG_FILE_MODE = 0o600

CREDENTIALS_HELP = (
    "Credentials, first found wins: THAW_URL / THAW_API_KEY; the config file "
    "($THAW_CONFIG_FILE or ~/.config/thaw/config.toml: url, api_key, or "
    "[profiles.NAME] with --profile NAME); then thaw up's dev key and "
    f"{DEFAULT_URL}. `thaw login` writes the config file.")


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


@dataclass(frozen=True)
class Credentials:
    url: str
    key: str


def credentials() -> Credentials:
    """The gateway URL and API key, by the order in the module docstring."""
    profile = os.environ.get("THAW_PROFILE", "").strip()
    url = os.environ.get("THAW_URL", "").strip()
    key = os.environ.get("THAW_API_KEY", "").strip()
    if not (url and key) or profile:
        section = _section(read_config(), profile)
        url = url or str(section.get("url", "")).strip()
        key = key or str(section.get("api_key", "")).strip()
    if not key:
        path = default_home() / "dev-key"
        if path.exists():
            key = path.read_text().strip()
    if not key:
        raise Unauthenticated("no API key: set THAW_API_KEY or run `thaw login` "
                              "(thaw up prints the dev key)")
    return Credentials((url or DEFAULT_URL).rstrip("/"), key)


def _toml_table(values: dict[str, Any]) -> str:
    # JSON strings are valid TOML basic strings (same escapes for what we write).
    return "".join(f"{k} = {json.dumps(str(v))}\n" for k, v in values.items()
                   if not isinstance(v, dict))


def write_config(config: dict[str, Any], path: Path) -> None:
    text = _toml_table(config)
    for name, section in sorted(config.get("profiles", {}).items()):
        text += f"\n[profiles.{json.dumps(name)}]\n" + _toml_table(section)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CONFIG_FILE_MODE)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, CONFIG_FILE_MODE)  # an existing file keeps its mode otherwise
