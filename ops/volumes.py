"""`thaw volume create|put|ls|rm|quota`: read-only model stores a function mounts
(`[volumes] "/models" = "NAME"` in thaw.toml; docs/volumes.md). Uploads are chunked
and content-addressed (ops/uploads.py): only the chunks the server lacks are sent."""

from __future__ import annotations

import datetime
from pathlib import Path

import click

from thaw.core.units import format_size
from thaw.ops.client import Client
from thaw.ops.output import print_table
from thaw.ops.uploads import put_volume


def _when(seconds: float | None) -> str:
    if not seconds:
        return "-"
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


@click.group()
def volume() -> None:
    """Model volumes: files uploaded once, mounted read-only into functions."""


@volume.command("create")
@click.argument("name")
def volume_create(name: str) -> None:
    """Create the empty volume NAME."""
    made = Client().request("POST", "/v1/volumes", json={"name": name}).json()
    click.echo(f"volume {made['name']} created")


@volume.command("put")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--prefix", default="", help="Folder inside the volume to put PATH under.")
def volume_put(name: str, path: Path, prefix: str) -> None:
    """Upload PATH (a file or a folder) into volume NAME, adding or replacing files.
    Only chunks the server lacks are sent: run it again after an interruption."""
    report = put_volume(Client(), name, path, prefix)
    click.echo(f"sent {report.chunks_sent} of {report.chunks_total} chunks "
               f"({format_size(report.bytes_sent)} of {format_size(report.bytes_total)}); "
               f"volume {name}: {report.result.get('files', 0)} files, "
               f"{format_size(int(report.result.get('size', 0)))}")


@volume.command("ls")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def volume_ls(name: str | None, as_json: bool) -> None:
    """Your volumes, or the files of volume NAME."""
    client = Client()
    if name is None:
        volumes = client.request("GET", "/v1/volumes").json()["volumes"]
        rows = [{"volume": v["name"], "files": v["files"], "size": format_size(v["size"]),
                 "updated": _when(v["updated_at"]),
                 "manifest": (v["manifest_digest"] or "-")[:12]} for v in volumes]
        print_table(volumes if as_json else rows,
                    ["volume", "files", "size", "updated", "manifest"], as_json)
        return
    detail = client.request("GET", f"/v1/volumes/{name}").json()
    files = [{"path": f["path"], "size": format_size(f["size"]), "mode": oct(f["mode"]),
              "chunks": len(f["chunks"])} for f in detail["contents"]]
    print_table(detail["contents"] if as_json else files,
                ["path", "size", "mode", "chunks"], as_json)


@volume.command("rm")
@click.argument("name")
def volume_rm(name: str) -> None:
    """Remove volume NAME (refused while a function mounts it)."""
    Client().request("DELETE", f"/v1/volumes/{name}")
    click.echo(f"volume {name} removed")


@volume.command("quota")
@click.argument("tenant")
@click.option("--max-storage", default=None,
              help="Bytes of chunks the tenant may store (e.g. 100GiB); omit = default.")
@click.option("--max-bundle", default=None,
              help="Largest bundle it may deploy (e.g. 2GiB); omit = default.")
def volume_quota(tenant: str, max_storage: str | None, max_bundle: str | None) -> None:
    """Set TENANT's storage limits (the operator only; both at once)."""
    made = Client().request("PUT", f"/v1/tenants/{tenant}/storage-quota", json={
        "max_storage_bytes": max_storage, "max_bundle_bytes": max_bundle}).json()
    click.echo(f"{made['tenant']}: stores {format_size(made['stored_bytes'])}, max storage "
               f"{format_size(made['max_storage_bytes'])}, max bundle "
               f"{format_size(made['max_bundle_bytes'])}")
