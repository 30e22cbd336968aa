"""`thaw env ls|gc`: the nodes' per-function Python environments (operator key;
docs/environments.md)."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from thaw.core.units import format_size
from thaw.ops.client import Client
from thaw.ops.output import print_table

# A collection removes folders on every node (the gateway's bound).
ENV_GC_TIMEOUT_SECONDS = 900.0


@click.group("env")
def env() -> None:
    """List and collect the nodes' per-function Python environments."""


def environment_rows(reply: dict[str, Any]) -> list[dict[str, object]]:
    """One row per environment per node: key, python, packages, size, functions,
    last used."""
    rows: list[dict[str, object]] = []
    for node in reply["nodes"]:
        for e in node["environments"]:
            used = e["last_used"]
            rows.append({
                "node": node["node"], "key": e["key"][:12], "python": e["python"],
                "packages": e["packages"], "size": format_size(e["size_bytes"]),
                "functions": ", ".join(e["functions"]) or "-",
                "in use": "yes" if e["in_use"] else "no",
                "last used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(used))
                if used else "-"})
    return rows


def _report_errors(reply: dict[str, Any]) -> None:
    failed = [n for n in reply["nodes"] if n.get("error")]
    for node in failed:
        click.echo(f"{node['node']}: {node['error']}", err=True)
    if failed:
        raise SystemExit(1)


COLUMNS = ["node", "key", "python", "packages", "size", "functions", "in use", "last used"]


@env.command("ls")
@click.option("--node", "node_id", default="", help="One node (default: every live node).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def env_ls(node_id: str, as_json: bool) -> None:
    """The environments each node holds: key, Python, packages, size, the functions
    that used it since its agent started, last used."""
    params = {"node": node_id} if node_id else {}
    reply = Client().request("GET", "/v1/nodes/environments", params=params).json()
    if as_json:
        click.echo(json.dumps(reply, indent=2))
    else:
        print_table(environment_rows(reply), COLUMNS, False)
    _report_errors(reply)


@env.command("gc")
@click.option("--node", "node_id", default="", help="One node (default: every live node).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def env_gc(node_id: str, as_json: bool) -> None:
    """Remove the environments no kept snapshot, live instance, build or template
    uses; those in use stay."""
    params = {"node": node_id} if node_id else {}
    reply = Client(timeout=ENV_GC_TIMEOUT_SECONDS).request(
        "POST", "/v1/nodes/environments/gc", params=params).json()
    if as_json:
        click.echo(json.dumps(reply, indent=2))
    else:
        for node in reply["nodes"]:
            if node.get("error"):
                continue
            removed = ", ".join(k[:12] for k in node["removed"]) or "nothing"
            click.echo(f"{node['node']}: removed {removed} "
                       f"({format_size(node['freed_bytes'])}); "
                       f"{len(node['environments'])} kept")
    _report_errors(reply)
