"""The CLI's output: one console and the one table printer of list commands."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

# Piped output is not cut at the terminal's width.
console = Console(width=200) if not sys.stdout.isatty() else Console()


def print_table(rows: list[dict[str, object]], columns: list[str], as_json: bool) -> None:
    """The one table printer of list commands (or JSON with --json)."""
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in columns:
        # URLs and ids are copied from here: never cut them short.
        table.add_column(column, overflow="fold", no_wrap=column in ("url", "id"))
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    console.print(table)
