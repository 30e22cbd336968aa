"""`thaw login`: saves the gateway URL and API key where the CLI finds them
(ops/credentials.py, which also gives the order in which they are looked up)."""

from __future__ import annotations

import click

from thaw.core.errors import ThawError
from thaw.ops.client import Client
from thaw.ops.credentials import (
    CONFIG_FILE_MODE,
    CREDENTIALS_HELP,
    DEFAULT_URL,
    Credentials,
    config_path,
    credentials,
    read_config,
    write_config,
)

__all__ = [
    "CONFIG_FILE_MODE", "CREDENTIALS_HELP", "DEFAULT_URL", "Credentials", "config_path",
    "credentials", "login", "read_config", "write_config",
]


@click.command()
@click.option("--url", required=True, help="The gateway, e.g. https://thaw.example.com.")
@click.option("--key", required=True, help="An API key (thaw up prints the dev key).")
@click.option("--profile", "profile", default="",
              help="Save under [profiles.NAME] instead of the defaults.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Try the key against the gateway before saving it.")
def login(url: str, key: str, profile: str, check: bool) -> None:
    """Save the gateway URL and API key in the config file (mode 0600)."""
    url = url.rstrip("/")
    if check:
        Client(url, key, timeout=10).request("GET", "/v1/functions")
    path = config_path()
    try:
        config = read_config(path)
    except ThawError:
        config = {}
    target = config.setdefault("profiles", {}).setdefault(profile, {}) if profile else config
    target.update({"url": url, "api_key": key})
    write_config(config, path)
    click.echo(f"saved {'profile ' + profile if profile else 'credentials'} to {path}")
