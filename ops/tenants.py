"""`thaw key create|ls|revoke` (a tenant's admin key; the operator may pass --tenant)
and `thaw tenant create|ls|quota|budget` (the operator: an admin key of the operator
tenant). Budgets (--rpm, --rpd, --tpm, --tpd) are docs/limits.md's."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable

import click

from thaw.core.units import format_size
from thaw.ops.client import Client
from thaw.ops.output import print_table

BUDGETS = ("rpm", "rpd", "tpm", "tpd")


def _budget_options(fn: Callable[..., None]) -> Callable[..., None]:
    """--rpm, --rpd (requests per minute, per day), --tpm, --tpd (tokens)."""
    for name, said in reversed((("rpm", "Requests per minute"), ("rpd", "Requests per day"),
                                ("tpm", "Tokens per minute (OpenAI routes)"),
                                ("tpd", "Tokens per day (OpenAI routes)"))):
        fn = click.option(f"--{name}", type=click.IntRange(min=0), default=None,
                          help=f"{said}; omit or 0 = no budget.")(fn)
    return fn


def _budgets(b: dict[str, int | None] | None) -> str:
    """`rpd=100 tpm=5000`, or `-` for none."""
    shown = [f"{k}={v}" for k, v in (b or {}).items() if v]
    return " ".join(shown) or "-"


def _when(seconds: float | None) -> str:
    if not seconds:
        return "-"
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _limit(value: int | None, size: bool = False) -> str:
    if value is None:
        return "unlimited"
    return format_size(value) if size else str(value)


@click.group()
def key() -> None:
    """API keys of your tenant (needs an admin key)."""


@key.command("create")
@click.option("--name", default="", help="A label to recognise the key by.")
@click.option("--scope", "scopes", multiple=True, default=("invoke",), show_default=True,
              type=click.Choice(["invoke", "deploy", "admin"]),
              help="Repeat for several; admin implies the others.")
@click.option("--expires-in", type=float, default=None,
              help="Seconds until the key stops working (default: never).")
@click.option("--tenant", default=None, help="Another tenant's key (operator only).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_budget_options
def key_create(name: str, scopes: tuple[str, ...], expires_in: float | None,
               tenant: str | None, as_json: bool, rpm: int | None, rpd: int | None,
               tpm: int | None, tpd: int | None) -> None:
    """Create a key. It is printed once: it cannot be shown again."""
    body: dict[str, object] = {"name": name, "scopes": list(scopes)}
    for field, value in zip(BUDGETS, (rpm, rpd, tpm, tpd), strict=True):
        if value:
            body[field] = value
    if expires_in is not None:
        body["expires_in"] = expires_in
    if tenant:
        body["tenant"] = tenant
    made = Client().request("POST", "/v1/keys", json=body).json()
    if as_json:
        click.echo(json.dumps(made, indent=2))
        return
    click.echo(f"key id:  {made['id']} (tenant {made['tenant']}, "
               f"scopes {','.join(made['scopes'])}, expires {_when(made['expires_at'])})")
    if any((made.get("budgets") or {}).values()):
        click.echo(f"budgets: {_budgets(made['budgets'])}")
    click.echo(f"key:     {made['key']}")
    click.echo("Store the key now: only its SHA-256 is kept, it cannot be shown again.",
               err=True)


@key.command("ls")
@click.option("--tenant", default=None, help="Another tenant's keys (operator only).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def key_ls(tenant: str | None, as_json: bool) -> None:
    """The tenant's keys (ids, never the keys)."""
    params = {"tenant": tenant} if tenant else {}
    keys = Client().request("GET", "/v1/keys", params=params).json()["keys"]
    if as_json:
        print_table(keys, [], True)
        return
    rows = [{"id": k["id"], "name": k["name"], "scopes": ",".join(k["scopes"]),
             "created": _when(k["created_at"]), "expires": _when(k["expires_at"]),
             "revoked": _when(k["revoked_at"]), "budgets": _budgets(k.get("budgets"))}
            for k in keys]
    print_table(rows, ["id", "name", "scopes", "created", "expires", "revoked", "budgets"],
                False)


@key.command("revoke")
@click.argument("key_id")
@click.option("--tenant", default=None, help="Another tenant's key (operator only).")
def key_revoke(key_id: str, tenant: str | None) -> None:
    """Revoke KEY_ID: refused at once by this gateway, by every replica within seconds."""
    params = {"tenant": tenant} if tenant else {}
    info = Client().request("DELETE", f"/v1/keys/{key_id}", params=params).json()
    click.echo(f"{info['id']}: revoked {_when(info['revoked_at'])}")


@click.group()
def tenant() -> None:
    """Tenants and their quotas (the platform operator only)."""


@tenant.command("create")
@click.argument("name")
def tenant_create(name: str) -> None:
    """Create tenant NAME; then `thaw key create --tenant NAME --scope admin`."""
    made = Client().request("POST", "/v1/tenants", json={"id": name}).json()
    click.echo(f"tenant {made['id']} created")


@tenant.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def tenant_ls(as_json: bool) -> None:
    """Every tenant with its quota."""
    tenants = Client().request("GET", "/v1/tenants").json()["tenants"]
    if as_json:
        print_table(tenants, [], True)
        return
    rows = [{"tenant": t["id"], "created": _when(t["created_at"]),
             "max memory": _limit(t["max_memory_bytes"], size=True),
             "max instances": _limit(t["max_instances"]),
             "budgets": _budgets(t.get("budgets"))} for t in tenants]
    print_table(rows, ["tenant", "created", "max memory", "max instances", "budgets"],
                False)


@tenant.command("quota")
@click.argument("name")
@click.option("--max-memory", default=None,
              help="Total slice memory of its live instances (e.g. 8GiB); omit = no limit.")
@click.option("--max-instances", type=click.IntRange(min=0), default=None,
              help="Live instances of all its functions; omit = no limit.")
def tenant_quota(name: str, max_memory: str | None, max_instances: int | None) -> None:
    """Set NAME's quota (both limits at once). Past it, new instances are refused with
    429 and Retry-After; warm instances keep serving."""
    made = Client().request("PUT", f"/v1/tenants/{name}/quota", json={
        "max_memory_bytes": max_memory, "max_instances": max_instances}).json()
    click.echo(f"{made['id']}: max memory {_limit(made['max_memory_bytes'], size=True)}, "
               f"max instances {_limit(made['max_instances'])}")


@tenant.command("budget")
@click.argument("name")
@_budget_options
def tenant_budget(name: str, rpm: int | None, rpd: int | None, tpm: int | None,
                  tpd: int | None) -> None:
    """Set NAME's budgets, shared by all its keys (all four at once: one omitted is
    none). Past one, calls get 429 with Retry-After and the budget named."""
    body = {field: value or None for field, value in zip(BUDGETS, (rpm, rpd, tpm, tpd),
                                                         strict=True)}
    made = Client().request("PUT", f"/v1/tenants/{name}/budgets", json=body).json()
    click.echo(f"{made['id']}: budgets {_budgets(made['budgets'])}")
