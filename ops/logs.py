"""`thaw fn logs NAME [-f] [--tail N] [--request ID]`: what a function's instances
printed, merged across nodes, or what one call printed (GET
/v1/functions/{name}/logs, NDJSON)."""

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
@click.option("--tail", type=int, default=None,
              help="Lines from the end to show first [default: 100; a call's: all].")
@click.option("--request", "request_id", default=None, metavar="ID",
              help="Only the lines one call printed: its X-Request-ID (a stored "
                   "invocation's id is its request id).")
@click.option("--json", "as_json", is_flag=True, help="Print the NDJSON lines as they come.")
def fn_logs(name: str, follow: bool, tail: int | None, request_id: str | None,
            as_json: bool) -> None:
    """Function NAME's logs: its instances' stdout/stderr and, marked *, the runtime's
    records of them (started, ready, ended), oldest first. With --request, exactly
    what the handler printed while it served that call."""
    if request_id and follow:
        raise click.UsageError("--follow cannot be combined with --request")
    params = {"follow": "true" if follow else "false"}
    if tail is not None:
        params["tail"] = str(tail)
    elif not request_id:
        params["tail"] = "100"
    if request_id:
        params["request"] = request_id
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
