"""`thaw snapshot prewarm|evict`: move a function's snapshot in and out of host memory."""

from __future__ import annotations

import click

from thaw.core.units import format_size
from thaw.ops.client import Client


@click.group()
def snapshot() -> None:
    """Prewarm and evict snapshots (pinned host-memory tier)."""


@snapshot.command("prewarm")
@click.argument("name")
@click.option("--node", default="", help="Only this node (default: every node holding it).")
def snapshot_prewarm(name: str, node: str) -> None:
    """Load function NAME's snapshot into the pinned tier; costs no GPU memory."""
    reply = Client(timeout=900).request("POST", f"/v1/functions/{name}/prewarm",
                                        params={"node": node} if node else None).json()
    gbps = reply["bytes"] / reply["seconds"] / 1e9 if reply["seconds"] else 0.0
    click.echo(f"{name}: {format_size(reply['bytes'])} into pinned memory on "
               f"{', '.join(reply['nodes']) or 'no node'} ({gbps:.2f} GB/s)")


@snapshot.command("evict")
@click.argument("name")
@click.option("--node", default="", help="Only this node (default: every node holding it).")
def snapshot_evict(name: str, node: str) -> None:
    """Drop function NAME's snapshot from the pinned tier (it stays on disk)."""
    reply = Client().request("POST", f"/v1/functions/{name}/evict",
                             params={"node": node} if node else None).json()
    click.echo(f"{name}: {format_size(reply['bytes'])} freed on "
               f"{', '.join(reply['nodes']) or 'no node'}")
