"""`thaw snapshot ls|inspect|prewarm|evict|verify`: your functions' snapshots, where
they are held, and passes over their chunks with a progress bar (bytes, GB/s)."""

from __future__ import annotations

import json
import sys

import click

from thaw.core.units import format_size
from thaw.ops.client import Client
from thaw.ops.output import console, print_table
from thaw.ops.progress import gbps, run_pass

# `thaw snapshot verify` found a bad or missing chunk (distinct from 1, an error).
EXIT_CORRUPT = 3
# Between two progress lines of a pass; must exceed nothing on the server (it sends
# one every platform/snapshot_passes.py PROGRESS_INTERVAL_SECONDS).
PASS_TIMEOUT = 600.0


@click.group()
def snapshot() -> None:
    """List, inspect, prewarm, evict and verify snapshots."""


@snapshot.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def snapshot_ls(as_json: bool) -> None:
    """Your functions' snapshots: size, chunks, and the nodes holding them on disk and
    in pinned host memory."""
    snaps = Client().request("GET", "/v1/snapshots").json()["snapshots"]
    if as_json:
        print_table(snaps, [], True)
        return
    rows = [{"function": s["name"], "version": s["version"], "id": s["id"],
             "state": s["state"], "size": format_size(s["raw_bytes"]),
             "stored": format_size(s["stored_bytes"]), "chunks": s["chunks"],
             "disk": ", ".join(s["disk_nodes"]) or "-",
             "pinned": ", ".join(s["pinned_nodes"]) or "-"} for s in snaps]
    print_table(rows, ["function", "version", "id", "state", "size", "stored", "chunks",
                       "disk", "pinned"], False)


@snapshot.command("inspect")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def snapshot_inspect(name: str, as_json: bool) -> None:
    """Function NAME's snapshot manifest: arenas, chunks, compression, fingerprint,
    setup time."""
    snap = Client().request("GET", f"/v1/snapshots/{name}").json()
    if as_json:
        click.echo(json.dumps(snap, indent=2))
        return
    m = snap["manifest"]
    fp = {k: v for k, v in m["fingerprint"].items() if v}
    console.print(f"[bold]{snap['function']}[/] v{snap['version']}  snapshot {snap['id']} "
                  f"({snap['state']})")
    console.print(f"  size        {format_size(snap['raw_bytes'])} raw, "
                  f"{format_size(snap['stored_bytes'])} stored, {snap['chunks']} chunks "
                  f"({', '.join(m['compression']) or 'none'})")
    for arena, a in m["arenas"].items():
        console.print(f"  {arena:<11} {format_size(a['size'])} in {a['chunks']} chunks "
                      f"({format_size(a['stored_bytes'])} stored)")
    console.print(f"  storages    {m['storages']}, modules {m['modules']}, format {m['format']}")
    console.print(f"  setup       {m['setup_seconds']:.3f}s (imports "
                  f"{m['import_seconds']:.3f}s, capture {m['capture_seconds']:.3f}s)")
    console.print("  fingerprint " + ", ".join(f"{k}={v}" for k, v in fp.items()))
    console.print(f"  disk        {', '.join(snap['disk_nodes']) or '-'}")
    console.print(f"  pinned      {', '.join(snap['pinned_nodes']) or '-'}")


@snapshot.command("prewarm")
@click.argument("name")
@click.option("--node", default="", help="Only this node (default: every node holding it).")
def snapshot_prewarm(name: str, node: str) -> None:
    """Load function NAME's snapshot into the pinned tier (a progress bar per node);
    costs no GPU memory."""
    summary = run_pass(Client(timeout=PASS_TIMEOUT), name, "prewarm", node)
    for error in summary["errors"]:
        click.echo(f"error: {error['node'] or name}: {error['error']}", err=True)
    click.echo(f"{name}: {format_size(summary['bytes'])} into pinned memory on "
               f"{', '.join(summary['nodes']) or 'no node'} "
               f"({gbps(summary['bytes'], summary['seconds']):.2f} GB/s)")
    if summary["errors"]:
        sys.exit(1)


@snapshot.command("evict")
@click.argument("name")
@click.option("--node", default="", help="Only this node (default: every node holding it).")
def snapshot_evict(name: str, node: str) -> None:
    """Drop function NAME's snapshot from the pinned tier (it stays on disk)."""
    reply = Client().request("POST", f"/v1/functions/{name}/evict",
                             params={"node": node} if node else None).json()
    click.echo(f"{name}: {format_size(reply['bytes'])} freed on "
               f"{', '.join(reply['nodes']) or 'no node'}")


@snapshot.command("verify")
@click.argument("name")
@click.option("--node", default="", help="Only this node (default: every node holding it).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def snapshot_verify(name: str, node: str, as_json: bool) -> None:
    """Check function NAME's snapshot on each node holding it: every chunk re-read from
    disk and from pinned memory against its SHA-256, and the sealed memfds that
    restores map (tier "arena": the host arena, pickle and snapshot.json) for their
    seals and their bytes. Exit code 3 if anything is bad or missing, 1 on other
    errors."""
    summary = run_pass(Client(timeout=PASS_TIMEOUT), name, "verify", node)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for bad in summary["bad"]:
            what = f"chunk {bad['digest']}" if bad["digest"] else "memfd"
            click.echo(f"BAD {bad['node']} {bad['tier']} {what}: {bad['reason']}")
        for error in summary["errors"]:
            click.echo(f"error: {error['node'] or name}: {error['error']}", err=True)
        verdict = "ok" if summary["ok"] else f"{len(summary['bad'])} bad chunk(s)"
        click.echo(f"{name}: {format_size(summary['bytes'])} verified on "
                   f"{', '.join(summary['nodes']) or 'no node'} "
                   f"({gbps(summary['bytes'], summary['seconds']):.2f} GB/s): {verdict}")
    if summary["bad"]:
        sys.exit(EXIT_CORRUPT)
    if summary["errors"]:
        sys.exit(1)
