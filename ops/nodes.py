"""`thaw node ls|cordon|uncordon|drain|gc`: operators' view of the nodes (operator key)."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from thaw.core.units import format_size
from thaw.ops.client import Client
from thaw.ops.output import print_table


@click.group()
def node() -> None:
    """List nodes, cordon, uncordon and drain them, collect their garbage."""


# What an operator is told about a node where no MPS daemon applies functions'
# gpu_compute shares (the same words as the function status, gateway/views.py).
GPU_COMPUTE_NOT_ENFORCED = "gpu_compute not enforced"

# PinnedTierInfo.lock as the gateway's node JSON carries it ("" or absent: an agent
# that does not report it).
PINNED_LOCKED = "locked"


def pinned_lock_note(pinned: dict[str, Any]) -> str:
    """What an operator should know about a node's pinned tier page-locking: "" when
    it is locked, else e.g. "pinned tier not locked: RLIMIT_MEMLOCK 8.0 MiB < 2.0 GiB"
    (unlocked memory can be swapped out, and on CUDA copies from it are staged)."""
    lock = pinned.get("lock") or ""
    if lock == PINNED_LOCKED:
        return ""
    if not lock:
        return "pinned tier locked unknown"
    refusal = pinned.get("lock_refusal") or "no reason reported"
    return f"pinned tier {lock}: {refusal}"


@node.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def node_ls(as_json: bool) -> None:
    """Nodes with their runtime (process or docker: only docker nodes run image
    functions), devices, pinned tier and instances; a note under the table for each
    node whose pinned tier is not page-locked, and why, for each node where
    gpu_compute shares are not enforced (no MPS daemon), and for each data directory
    of a node that is full or read-only."""
    nodes = Client().request("GET", "/v1/nodes").json()["nodes"]
    if as_json:
        print_table(nodes, [], True)
        return
    rows = [{
        "node": n["id"], "state": n["state"], "runtime": n.get("runtime", "process"),
        "instances": n["instances"],
        "devices": ", ".join(f"{d['id']} {format_size(d['used_bytes'])}/"
                             f"{format_size(d['capacity_bytes'])}" for d in n["devices"]),
        "pinned": f"{format_size(n['pinned']['used_bytes'])}/"
                  f"{format_size(n['pinned']['capacity_bytes'])}"
                  + ("" if n["pinned"].get("lock") in (PINNED_LOCKED, "", None)
                     else f" ({n['pinned']['lock']})"),
        "disk": format_size(n["disk_bytes"]),
    } for n in nodes]
    print_table(rows, ["node", "state", "runtime", "instances", "devices", "pinned", "disk"],
                False)
    for n in nodes:
        note = pinned_lock_note(n["pinned"])
        if note:
            click.echo(f"{n['id']}: {note}")
        if n.get("mps_active") is False:  # absent: a gateway too old to say
            click.echo(f"{n['id']}: {GPU_COMPUTE_NOT_ENFORCED} (no MPS daemon)")
        for c in n.get("conditions", []):
            click.echo(f"{n['id']}: {c['path']} is {c['type'].replace('_', '-')} "
                       f"({c['message']}): builds and chunk writes refused (507)")


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


# How often `thaw node drain` asks again while it waits for the node to empty.
DRAIN_POLL_SECONDS = 1.0


@node.command("drain")
@click.argument("node_id")
@click.option("--timeout", default=300.0, show_default=True,
              help="Seconds to wait for the node's instances to end.")
@click.option("--no-wait", is_flag=True, help="Start the drain and return.")
def node_drain(node_id: str, timeout: float, no_wait: bool) -> None:
    """Cordon NODE_ID, stop its idle instances and let busy ones finish their calls;
    waits until it runs no instance (exit 1 if --timeout passes first)."""
    client = Client()
    reply = client.request("POST", f"/v1/nodes/{node_id}/drain").json()
    click.echo(f"{node_id}: cordoned; stopped {reply['stopped']} idle instance(s), "
               f"{reply['finishing']} finishing")
    if no_wait:
        return
    deadline = time.monotonic() + timeout
    left = reply["node"]["instances"]
    while left:
        if time.monotonic() > deadline:
            click.echo(f"error: {node_id} still runs {left} instance(s) after "
                       f"{timeout:g}s", err=True)
            raise SystemExit(1)
        time.sleep(DRAIN_POLL_SECONDS)
        # Asked again: instances that were starting or busy are stopped once idle.
        left = client.request("POST", f"/v1/nodes/{node_id}/drain").json()["node"]["instances"]
    click.echo(f"{node_id}: drained (no instances)")


# One node's collection walks its bundles, builds and logs; every node's in turn.
GC_TIMEOUT_SECONDS = 1800.0


def garbage_line(node: dict[str, Any]) -> str:
    """`n1: freed 1.1 GiB (bundles 1.0 GiB in 3, logs 2.0 MiB in 385)`, or the error."""
    if node.get("error"):
        return f"{node['node']}: not collected: {node['error']}"
    parts = ", ".join(f"{f['kind']} {format_size(f['bytes'])} in {f['items']}"
                      for f in node.get("freed", []) if f["items"] or f["bytes"])
    return f"{node['node']}: freed {format_size(node['freed_bytes'])}" + (
        f" ({parts})" if parts else "")


@node.command("gc")
@click.argument("node_id", required=False, default="")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def node_gc(node_id: str, as_json: bool) -> None:
    """Collect garbage on NODE_ID (or every live node) now: bundles and snapshots no
    kept version uses, unpack folders, build leftovers and old instance logs. The
    bytes each node freed also go to the event log (garbage_collected)."""
    path = f"/v1/nodes/{node_id}/gc" if node_id else "/v1/nodes/gc"
    reply = Client(timeout=GC_TIMEOUT_SECONDS).request("POST", path).json()
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    for entry in reply["nodes"]:
        click.echo(garbage_line(entry))
    if any(entry.get("error") for entry in reply["nodes"]):
        raise SystemExit(1)
