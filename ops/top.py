"""`thaw top`: a live view of the platform: nodes (state, pressure, devices, pinned
memory), the instances on each, and your functions."""

from __future__ import annotations

import time
from typing import Any

import click
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from thaw.core.errors import ThawError
from thaw.core.units import format_size
from thaw.ops.client import Client
from thaw.ops.output import console

PRESSURE_STYLE = {"normal": "green", "pressure": "yellow", "critical": "red",
                  "emergency": "bold red"}


def _table(title: str, columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left", box=None, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _used(used: int, capacity: int) -> str:
    return f"{format_size(used)}/{format_size(capacity)}"


def frame(client: Client) -> RenderableType:
    """One screen: fetched now, drawn at once."""
    parts: list[RenderableType] = []
    try:
        nodes: list[dict[str, Any]] | None = client.request("GET", "/v1/nodes").json()["nodes"]
    except ThawError as exc:
        nodes = None
        parts.append(Text(f"nodes: {exc.message}", style="dim"))
    functions = client.request("GET", "/v1/functions").json()["functions"]
    if nodes is not None:
        table = _table("nodes", ["node", "state", "pressure", "devices", "pinned",
                                 "instances", "cpu", "memory"])
        for n in nodes:
            t = n.get("telemetry", {})
            table.add_row(
                n["id"], n["state"],
                Text(n.get("pressure", "normal"),
                     style=PRESSURE_STYLE.get(n.get("pressure", "normal"), "")),
                ", ".join(f"{d['id']} {_used(d['used_bytes'], d['capacity_bytes'])}"
                          for d in n["devices"]),
                _used(n["pinned"]["used_bytes"], n["pinned"]["capacity_bytes"]),
                str(n["instances"]), f"{t.get('cpu_percent', 0.0):.0f}%",
                _used(t.get("memory_used_bytes", 0), t.get("memory_total_bytes", 0)))
        parts.append(table)
        instances = _table("instances", ["node", "instance", "function", "rss", "unique",
                                         "cpu"])
        for n in nodes:
            for i in n.get("telemetry", {}).get("instances", []):
                instances.add_row(n["id"], i["id"], i["function"], format_size(i["rss_bytes"]),
                                  format_size(i["unique_bytes"]), f"{i['cpu_percent']:.0f}%")
        parts.append(instances)
    fns = _table("functions", ["function", "version", "state", "start", "warm", "snapshot"])
    for f in functions:
        fns.add_row(f["name"], str(f["version"]), f["state"], f["start_mode"],
                    str(f["warm_instances"]), format_size(f["snapshot_bytes"]))
    parts.append(fns)
    return Group(*parts)


@click.command()
@click.option("--once", is_flag=True, help="Print one frame and exit (scripts, tests).")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between frames.")
def top(once: bool, interval: float) -> None:
    """Live view of nodes, devices, instances and functions (nodes need an operator
    key); Ctrl-C quits."""
    client = Client(timeout=10)
    if once:
        console.print(frame(client))
        return
    with Live(frame(client), console=console, auto_refresh=False,
              screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(frame(client), refresh=True)
        except KeyboardInterrupt:
            pass
