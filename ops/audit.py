"""`thaw audit`: who did what, when, from where, and how it went (the audit log).
A tenant's admin key sees its tenant's entries (the operator's actions on it
included); the operator's sees every tenant's."""

from __future__ import annotations

import datetime

import click

from thaw.core.errors import ThawError
from thaw.core.units import parse_duration
from thaw.ops.client import Client
from thaw.ops.output import print_table


@click.command()
@click.option("--since", default=None,
              help="Only entries this recent (e.g. 1h, 30m, 86400).")
@click.option("--action", default="",
              help="One action (function.deploy) or a prefix ending in '.' (key.).")
@click.option("--tenant", default="", help="One tenant (operator only).")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def audit(since: str | None, action: str, tenant: str, limit: int, as_json: bool) -> None:
    """The audit log, newest first: deploys, deletes, rollbacks, keys created and
    revoked, prewarms, evictions, drains, config changes, and refused attempts."""
    params: dict[str, str | int | float] = {"limit": limit}
    if since:
        try:
            params["from"] = datetime.datetime.now().timestamp() - parse_duration(since)
        except ValueError as exc:
            raise ThawError(f"--since: {exc}") from exc
    if action:
        params["action"] = action
    if tenant:
        params["tenant"] = tenant
    entries = Client().request("GET", "/v1/audit", params=params).json()["entries"]
    if as_json:
        print_table(entries, [], True)
        return
    rows = [{"time": datetime.datetime.fromtimestamp(e["time"]).strftime("%Y-%m-%d %H:%M:%S"),
             "tenant": e["tenant"] or "-", "key": _who(e), "action": e["action"],
             "target": e["target"], "from": e["source"],
             "outcome": f"{e['outcome']} ({e['status']})"} for e in entries]
    print_table(rows, ["time", "tenant", "key", "action", "target", "from", "outcome"], False)


def _who(entry: dict[str, str]) -> str:
    """The acting key's id; with its tenant when that is not the one acted upon (the
    operator acting on a tenant)."""
    key_id = entry["key_id"] or "-"
    actor = entry.get("actor_tenant") or entry["tenant"]
    return key_id if actor == entry["tenant"] else f"{key_id} ({actor})"
