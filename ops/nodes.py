"""`thaw node ls|cordon|uncordon`: operators' view of the nodes (admin key)."""

from __future__ import annotations

import click

from thaw.core.units import format_size
from thaw.ops.client import Client
from thaw.ops.functions import print_table


@click.group()
def node() -> None:
    """List nodes, cordon and uncordon them."""


@node.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def node_ls(as_json: bool) -> None:
    """Nodes with their devices, pinned tier and instances."""
    nodes = Client().request("GET", "/v1/nodes").json()["nodes"]
    if as_json:
        print_table(nodes, [], True)
        return
    rows = [{
        "node": n["id"], "state": n["state"], "instances": n["instances"],
        "devices": ", ".join(f"{d['id']} {format_size(d['used_bytes'])}/"
                             f"{format_size(d['capacity_bytes'])}" for d in n["devices"]),
        "pinned": f"{format_size(n['pinned']['used_bytes'])}/"
                  f"{format_size(n['pinned']['capacity_bytes'])}",
        "disk": format_size(n["disk_bytes"]),
    } for n in nodes]
    print_table(rows, ["node", "state", "instances", "devices", "pinned", "disk"], False)


@node.command("cordon")
@click.argument("node_id")
def node_cordon(node_id: str) -> None:
    """Place no new instances on NODE_ID (its running instances keep serving)."""
    state = Client().request("POST", f"/v1/nodes/{node_id}/cordon").json()["state"]
    click.echo(f"{node_id}: {state}")


@node.command("uncordon")
@click.argument("node_id")
def node_uncordon(node_id: str) -> None:
    """Let NODE_ID take new instances again."""
    state = Client().request("POST", f"/v1/nodes/{node_id}/uncordon").json()["state"]
    click.echo(f"{node_id}: {state}")
