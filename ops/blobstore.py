"""`thaw blobstore migrate [ROOT ...]`: give a node's chunks written before BLAKE3 their
BLAKE3 names, in place (hard links, no copies; docs/disk-tier.md). Run on the node; it
is safe while the agent serves and safe to run again."""

from __future__ import annotations

import json
from pathlib import Path

import click

from thaw.blobstore.migrate import migrate_root
from thaw.client.credentials import thaw_home
from thaw.core.errors import InvalidArgument


def local_stores(home: Path) -> list[Path]:
    """The disk tiers of the agents `thaw up` runs under `home`."""
    return sorted(p for p in (home / "agent").glob("*/chunks") if p.is_dir())


@click.group("blobstore")
def blobstore() -> None:
    """The node's chunk store (the disk tier)."""


@blobstore.command("migrate")
@click.argument("roots", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Threads hashing chunks (default: the cores).")
def migrate(roots: tuple[Path, ...], workers: int | None) -> None:
    """Give SHA-256-named chunks BLAKE3 names. ROOT is a disk tier's folder
    (<home>/agent/<node>/chunks); without one, every agent's under $THAW_HOME. Prints a
    JSON report per folder; exits 1 when a chunk is corrupt (left as it was, listed)."""
    folders = list(roots) or local_stores(thaw_home())
    if not folders:
        raise InvalidArgument(f"no chunk store under {thaw_home()}/agent: name a folder",
                              field="root")
    corrupt = False
    for folder in folders:
        report = migrate_root(str(folder), workers)
        click.echo(json.dumps({"root": str(folder), **report.to_dict()}))
        corrupt = corrupt or bool(report.corrupt)
    if corrupt:
        raise SystemExit(1)
