"""`thaw usage`: what your functions used (GET /v1/usage), as a table, JSON or CSV."""

from __future__ import annotations

import json
from typing import Any

import click

from thaw.core.units import format_size
from thaw.ops.client import Client
from thaw.ops.output import print_table

TIME_HELP = "ISO 8601 (2030-01-31, 2030-01-31T12:00:00Z) or unix seconds"


def _table_row(key: str, row: dict[str, Any], currency: str = "") -> dict[str, object]:
    cost = {f"cost {currency}": row.get("cost", "0")} if currency else {}
    return {
        "": key, "calls": row["invocations"], "errors": row["errors"],
        "cold": row["cold_starts"], "wall s": f"{row['wall_seconds']:.3f}",
        "queue s": f"{row['queue_seconds']:.3f}",
        "restore s": f"{row['restore_seconds']:.3f}",
        "GiB-s": f"{row['gib_seconds']:.3f}", "compute s": f"{row['compute_seconds']:.3f}",
        "in": format_size(row["bytes_in"]), "out": format_size(row["bytes_out"]),
        **cost,
    }


@click.command("usage")
@click.option("--from", "from_", default=None,
              help=f"Start: {TIME_HELP}. Default: 24 hours before --to.")
@click.option("--to", default=None, help=f"End: {TIME_HELP}. Default: now.")
@click.option("--group-by", type=click.Choice(["function", "day", "hour"]),
              default="function", show_default=True,
              help="One row per function, per UTC day or per UTC hour.")
@click.option("--function", default=None, help="Only this function.")
@click.option("--tenant", default=None, help="Another tenant's usage (operator only).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON document.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (for a spreadsheet).")
def usage(from_: str | None, to: str | None, group_by: str, function: str | None,
          tenant: str | None, as_json: bool, as_csv: bool) -> None:
    """What your functions used: calls, errors, cold starts, wall, queue and restore
    seconds, GiB-seconds of slice memory, compute seconds, bytes in and out, and cost
    (each call priced at the operator's prices when it was metered; docs/usage.md).

    Sums over the UTC hours that overlap [--from, --to); a call counts in the hour it
    ended. The gateway meters every call that reached an instance."""
    if as_json and as_csv:
        raise click.UsageError("--json and --csv exclude each other")
    params = {"group_by": group_by, "format": "csv" if as_csv else "json"}
    for name, value in (("from", from_), ("to", to), ("function", function),
                        ("tenant", tenant)):
        if value:
            params[name] = value
    resp = Client().request("GET", "/v1/usage", params=params)
    if as_csv:
        click.echo(resp.text, nl=False)
        return
    doc = resp.json()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    # Cost shows once the gateway prices calls or the range holds priced calls.
    shown = doc.get("priced") or doc["totals"].get("cost_nanos", 0) > 0
    currency = str(doc.get("currency") or "") if shown else ""
    rows = [_table_row(row["key"], row, currency) for row in doc["rows"]]
    rows.append(_table_row("total", doc["totals"], currency))
    click.echo(f"{doc['tenant']}: {doc['from']} to {doc['to']}, by {doc['group_by']}")
    print_table(rows, list(rows[0]), False)
