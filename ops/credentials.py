"""Where the CLI finds the gateway and the API key (`thaw login`, ops/config.py, saves
them): the reading side is thaw.client.credentials, so the Python client and the CLI
find the same ones.

Order, first found wins (each of url and key on its own):
1. THAW_URL / THAW_API_KEY in the environment;
2. the config file ($THAW_CONFIG_FILE, else ~/.config/thaw/config.toml): `url` and
   `api_key` at the top, or under `[profiles.<name>]` with `--profile <name>`
   (or THAW_PROFILE);
3. what `thaw up` wrote in $THAW_HOME: its development key (dev-key) and the URL of
   its gateway (dev-url, so `thaw up --port P` is remembered), else
   http://127.0.0.1:8000.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from thaw.client.credentials import (
    DEFAULT_URL,
    Credentials,
    config_path,
    credentials,
    read_config,
)

__all__ = ["CONFIG_FILE_MODE", "CREDENTIALS_HELP", "DEFAULT_URL", "Credentials",
           "config_path", "credentials", "read_config", "write_config"]

# Written with this mode: the file holds an API key.
CONFIG_FILE_MODE = 0o600

CREDENTIALS_HELP = (
    "Credentials, first found wins: THAW_URL / THAW_API_KEY; the config file "
    "($THAW_CONFIG_FILE or ~/.config/thaw/config.toml: url, api_key, or "
    "[profiles.NAME] with --profile NAME); then thaw up's dev key and gateway "
    f"(else {DEFAULT_URL}). `thaw login` writes the config file.")


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
