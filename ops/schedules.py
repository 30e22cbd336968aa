"""`thaw schedule ls`: the tenant's cron schedules (docs/schedules.md), each with its
next run, from the functions' records."""

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
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedule_ls(as_json: bool) -> None:
    """Every schedule of the tenant's functions: cron, time zone, input, next run (UTC)."""
    functions = Client().request("GET", "/v1/functions").json()["functions"]
    rows: list[dict[str, object]] = []
    for fn in functions:
        for sched in fn.get("schedules") or []:
            rows.append({"function": fn["name"], "cron": sched["cron"],
                         "timezone": sched["timezone"], "enabled": sched["enabled"],
                         "input": json.dumps(sched["input"]),
                         "next_run": (sched["next_run_at"] if as_json
                                      else utc(sched["next_run_at"]))})
    print_table(rows, ["function", "cron", "timezone", "enabled", "next_run", "input"],
                as_json=as_json)
