"""`thaw config show`, and the settings flags the service commands share.

The services' settings are read in one place, thaw.core.config: a flag
(`--set KEY=VALUE`), then the environment (`THAW_<KEY>`), then the config file
(`--config FILE`, else `$THAW_CONFIG`, its [scheduler], [gateway] or [agent] table),
then the default. `thaw config show` prints what a service started with the same flags
and environment would use, and where each value came from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.markup import escape

from thaw.core.config import COMPONENTS, Setting
from thaw.ops.output import print_table

F = TypeVar("F", bound=Callable[..., Any])

SETTINGS_HELP = (
    "Settings, first found wins: --set KEY=VALUE; the environment (THAW_KEY); the "
    "config file (--config FILE, else $THAW_CONFIG: the component's TOML table); "
    "the default. `thaw config show COMPONENT` prints them with their sources.")


def settings_options(command: F) -> F:
    """The `--set` and `--config` options of a command that reads a component's settings."""
    command = click.option(
        "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
        default=None, help="TOML config file (instead of $THAW_CONFIG).")(command)
    return click.option(
        "--set", "sets", multiple=True, metavar="KEY=VALUE",
        help="A setting for this run, before the environment and the config file "
             "(repeatable; values as in THAW_KEY).")(command)


def parse_sets(sets: tuple[str, ...]) -> dict[str, str]:
    """`("gateway_port=9000", ...)` -> {"gateway_port": "9000", ...}."""
    out: dict[str, str] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        out[key.strip()] = value
    return out


def _shown(value: Any) -> str:
    # The table is rich's: brackets (a file's [table], a JSON list) are not markup here.
    return escape(value if isinstance(value, str) else json.dumps(value))


def _row(component: str, setting: Setting) -> dict[str, object]:
    return {"component": component, "key": setting.key, "value": setting.value,
            "source": setting.source, "from": setting.origin, "doc": setting.doc}


@click.group("config")
def config_group() -> None:
    """The services' configuration."""


@config_group.command("show")
@click.argument("component", type=click.Choice(list(COMPONENTS)), required=False)
@settings_options
@click.option("--json", "as_json", is_flag=True, help="JSON: one object per setting.")
def show(component: str | None, sets: tuple[str, ...], config_file: Path | None,
         as_json: bool) -> None:
    """Print the effective configuration of COMPONENT (every component without one):
    each setting's value and where it came from -- flag (--set), env (THAW_KEY), file
    (--config or $THAW_CONFIG, with its table) or default. Secrets (passwords in URLs,
    webhook tokens) are masked. A bad or unknown setting is an error naming its key."""
    flags = parse_sets(sets)
    if flags and component is None:
        raise click.UsageError("--set needs a COMPONENT")
    names = [component] if component else list(COMPONENTS)
    rows = [_row(name, s) for name in names
            for s in COMPONENTS[name].explain(flags=flags, config_file=config_file)]
    if as_json:
        print_table(rows, [], as_json=True)
        return
    shown = [{**row, "value": _shown(row["value"]), "from": _shown(row["from"])}
             for row in rows]
    columns = ["key", "value", "source", "from"]
    print_table(shown, columns if component else ["component", *columns], as_json=False)
