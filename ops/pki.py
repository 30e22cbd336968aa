"""`thaw pki init|issue|show`: the platform's CA and the certificates its services
present to each other (mutual TLS on internal gRPC; docs/security.md). `thaw up` makes
them itself under $THAW_HOME/pki; these commands are for multi-machine and Kubernetes
installs."""

from __future__ import annotations

from pathlib import Path

import click

from thaw.core.config import default_home
from thaw.core.pki import (
    COMPONENTS,
    PKI_FOLDER,
    certificates,
    ensure_pki,
    issue_certificate,
)
from thaw.ops.output import print_table

_DIR_HELP = "The PKI folder (default: $THAW_HOME/pki)."
_HOST_HELP = ("A host name or IP address the certificates name, besides localhost, "
              "127.0.0.1, ::1 and thaw-<component> (repeatable).")


def _folder(directory: Path | None) -> Path:
    return (directory or default_home() / PKI_FOLDER).resolve()


@click.group()
def pki() -> None:
    """The platform CA and the services' certificates for internal mutual TLS."""


@pki.command("init")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False),
              default=None, help=_DIR_HELP)
@click.option("--host", "hosts", multiple=True, metavar="HOST", help=_HOST_HELP)
def pki_init(directory: Path | None, hosts: tuple[str, ...]) -> None:
    """Create the CA and the scheduler, gateway and agent certificates (files mode
    0600). Run again, it keeps what is still good and issues only what is missing,
    lacks a host or expires within 30 days. ca.key stays here: give each machine only
    ca.crt and its own component's certificate and key."""
    folder = _folder(directory)
    paths = ensure_pki(folder, hosts)
    click.echo(f"platform CA    {paths.ca_cert}")
    for component in COMPONENTS:
        click.echo(f"{component:<14} {paths.cert(component)}  {paths.key(component)}")


@pki.command("issue")
@click.argument("component", type=click.Choice(COMPONENTS))
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False),
              default=None, help=_DIR_HELP)
@click.option("--host", "hosts", multiple=True, metavar="HOST", help=_HOST_HELP)
def pki_issue(component: str, name: str, directory: Path | None,
              hosts: tuple[str, ...]) -> None:
    """Another certificate of COMPONENT from the folder's CA, as NAME.crt and NAME.key
    (one per agent machine, say: `thaw pki issue agent gpu-3 --host gpu-3`)."""
    paths = issue_certificate(_folder(directory), component, name, hosts)
    click.echo(f"{component:<14} {paths.cert(name)}  {paths.key(name)}")


@pki.command("show")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False),
              default=None, help=_DIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def pki_show(directory: Path | None, as_json: bool) -> None:
    """The folder's CA and certificates: component, names, expiry, signed by the CA."""
    rows: list[dict[str, object]] = [
        {"name": c.name, "component": c.component, "hosts": " ".join(c.hosts),
         "expires": c.not_after.strftime("%Y-%m-%d"), "from_ca": c.from_ca}
        for c in certificates(_folder(directory))]
    print_table(rows, ["name", "component", "hosts", "expires", "from_ca"], as_json)
