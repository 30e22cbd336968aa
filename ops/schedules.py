"""`thaw schedule ls`: the tenant's cron schedules (docs/schedules.md), each with its
next run and how its last due time went (GET /v1/schedules)."""

from __future__ import annotations

import json
import time

import click

from thaw.ops.client import Client
from thaw.ops.output import print_table


def utc(seconds: float | None) -> str:
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


@click.group()
def schedule() -> None:
    """Functions' cron schedules ([schedule] in thaw.toml)."""


@schedule.command("ls")
@click.option("--function", "function", default="", metavar="NAME",
              help="Only this function's schedules.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedule_ls(function: str, as_json: bool) -> None:
    """Every schedule of the tenant's functions: cron, time zone, next run, last run
    (UTC) with its outcome (skipped, refused, or the run's status) and invocation."""
    params = {"function": function} if function else {}
    found = Client().request("GET", "/v1/schedules", params=params).json()["schedules"]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    rows = [{"function": s["function"], "cron": s["cron"], "timezone": s["timezone"],
             "enabled": s["enabled"], "next_run": utc(s["next_run_at"]),
             "last_run": utc(s["last_run_at"]), "last_outcome": s["last_outcome"] or "-",
             "last_invocation": s["last_invocation_id"] or "-",
             "input": json.dumps(s["input"])} for s in found]
    print_table(rows, ["function", "cron", "timezone", "enabled", "next_run", "last_run",
                       "last_outcome", "last_invocation", "input"], as_json=False)
