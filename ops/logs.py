"""`thaw fn logs NAME [-f] [--tail N]`: what a function's instances printed, merged
across nodes (GET /v1/functions/{name}/logs, NDJSON)."""

from __future__ import annotations

import json
import time

import click

from thaw.ops.client import Client


def format_line(entry: dict[str, object]) -> str:
    stamp = float(entry.get("time", 0.0))  # type: ignore[arg-type]
    clock = time.strftime("%H:%M:%S", time.localtime(stamp)) + f".{int(stamp * 1000) % 1000:03d}"
    marker = "*" if entry.get("stream") == "runtime" else " "
    return f"{clock} {entry.get('instance', '')}{marker} {entry.get('line', '')}"


@click.command("logs")
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
@click.option("--tail", default=100, show_default=True, help="Lines from the end to show first.")
@click.option("--json", "as_json", is_flag=True, help="Print the NDJSON lines as they come.")
def fn_logs(name: str, follow: bool, tail: int, as_json: bool) -> None:
    """Function NAME's logs: its instances' stdout/stderr and, marked *, the runtime's
    records of them (started, ready, ended), oldest first."""
    params = {"tail": str(tail), "follow": "true" if follow else "false"}
    # A followed stream may stay quiet for hours: no read timeout then.
    client = Client(timeout=60.0)
    try:
        with client.stream("GET", f"/v1/functions/{name}/logs", params=params,
                           timeout=None if follow else 60.0) as resp:
            for raw in resp.iter_lines():
                if not raw.strip():
                    continue
                click.echo(raw if as_json else format_line(json.loads(raw)))
    except KeyboardInterrupt:
        pass
