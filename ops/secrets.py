"""`thaw secret set NAME` / `ls` / `rm NAME`: the tenant's secrets, through
/v1/secrets (a key with the `deploy` scope; docs/secrets.md).

A value is read from stdin or from a file (`--from-file`), never from the command
line: argv is visible to every user of the machine (ps) and lands in shell history.
A function receives the secrets its thaw.toml lists (`secrets = ["NAME"]`) as
environment variables.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from urllib.parse import quote

import click

from thaw.core.errors import InvalidArgument
from thaw.ops.client import Client
from thaw.ops.output import print_table

# Kept in sync with scheduler/secrets.py MAX_SECRET_BYTES (the server refuses past it).
MAX_VALUE_BYTES = 64 * 1024


def read_value(from_file: Path | None) -> str:
    """The value: the file's bytes, or stdin's, as UTF-8; one trailing newline (what
    `echo` and editors add) is dropped."""
    if from_file is not None:
        data = from_file.read_bytes()[:MAX_VALUE_BYTES + 2]
    else:
        if sys.stdin.isatty():
            click.echo("Enter the value, then end it with Ctrl-D:", err=True)
        data = sys.stdin.buffer.read(MAX_VALUE_BYTES + 2)
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if len(data) > MAX_VALUE_BYTES:
        raise InvalidArgument(f"a secret's value is at most {MAX_VALUE_BYTES} bytes",
                              field="value")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument("a secret's value must be UTF-8 text (base64 binary data "
                              "first)", field="value") from exc


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _tenant(tenant: str) -> dict[str, str]:
    return {"tenant": tenant} if tenant else {}


TENANT_OPTION = click.option("--tenant", default="",
                             help="The operator only: act on this tenant's secrets.")


@click.group("secret")
def secret() -> None:
    """Secrets your functions receive as environment variables (thaw.toml `secrets`)."""


@secret.command("set")
@click.argument("name")
@click.option("--from-file", "from_file", type=click.Path(exists=True, dir_okay=False,
                                                          path_type=Path),
              help="Read the value from this file instead of stdin.")
@TENANT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON document.")
def secret_set(name: str, from_file: Path | None, tenant: str, as_json: bool) -> None:
    """Set secret NAME to the value on stdin (or in --from-file), encrypted at rest.

    Never put a value on the command line. A new value stops the running instances
    of the functions that use it: their next instances get the new value."""
    value = read_value(from_file)
    doc = Client().request("PUT", f"/v1/secrets/{quote(name, safe='')}",
                           params=_tenant(tenant), json={"value": value}).json()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    verb = "created" if doc["version"] == 1 else f"updated (version {doc['version']})"
    click.echo(f"secret {doc['name']} {verb}")
    if doc.get("functions"):
        click.echo(f"used by {', '.join(doc['functions'])}; "
                   f"{doc.get('drained', 0)} instance(s) stopped for the new value",
                   err=True)


@secret.command("ls")
@TENANT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def secret_ls(tenant: str, as_json: bool) -> None:
    """List your secrets: names and times, never values."""
    doc = Client().request("GET", "/v1/secrets", params=_tenant(tenant)).json()
    rows: list[dict[str, object]] = [
        {"name": s["name"], "version": s["version"], "updated": _when(s["updated_at"]),
         "created": _when(s["created_at"])} for s in doc["secrets"]]
    if as_json:
        click.echo(json.dumps(doc["secrets"], indent=2))
        return
    print_table(rows, ["name", "version", "updated", "created"], False)


@secret.command("rm")
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Delete even if functions use it (their new instances then fail to "
                   "start until it is set again).")
@TENANT_OPTION
def secret_rm(name: str, force: bool, tenant: str) -> None:
    """Delete secret NAME (refused while a function's thaw.toml lists it)."""
    params = {**_tenant(tenant), **({"force": "true"} if force else {})}
    doc = Client().request("DELETE", f"/v1/secrets/{quote(name, safe='')}",
                           params=params).json()
    click.echo(f"secret {doc['name']} deleted")
    if doc.get("used_by"):
        click.echo(f"still named by {', '.join(doc['used_by'])}: their new instances "
                   "fail to start until it is set again", err=True)
