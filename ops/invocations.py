"""`thaw inv ...`: stored invocations (async, past the sync wait limit, or with an
Idempotency-Key) through /v1/invocations; `thaw invoke --async` submits one."""

from __future__ import annotations

import datetime
import json
import sys
import time
from typing import Any

import click

from thaw.core.errors import ThawError
from thaw.core.units import format_size
from thaw.ops.client import Client
from thaw.ops.output import print_table

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
# The gateway holds a result request up to its sync_wait_seconds (at most 3600, see
# gateway/config.py) before answering 303 "still running": wait a little longer.
RESULT_REQUEST_TIMEOUT = 3700.0


def submit_async(client: Client, path: str, body: bytes, headers: dict[str, str]) -> None:
    """POST to a function URL with `Prefer: respond-async`; print the invocation's id,
    then its URL (one per line, so `| head -1` is the id)."""
    resp = client.request("POST", path, content=body,
                          headers={**headers, "Prefer": "respond-async"})
    if resp.status_code != 202:
        # A gateway without stored invocations answered the call itself.
        raise ThawError(f"the gateway ran the call instead of queueing it "
                        f"(answered {resp.status_code})")
    accepted = resp.json()
    click.echo(accepted["id"])
    click.echo(f"{client.url}{accepted['url']}")
    click.echo(f"# {accepted['status']}; `thaw inv get {accepted['id']}` for its status, "
               f"`thaw inv result {accepted['id']}` for its answer", err=True)


def _when(unix: float | None) -> str:
    if not unix:
        return ""
    return datetime.datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}s"


def _get(client: Client, invocation_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = client.request("GET", f"/v1/invocations/{invocation_id}").json()
    return doc


@click.group("inv")
def inv() -> None:
    """Stored invocations: status, result, cancel.

    An invocation is stored when it is submitted async (`thaw invoke NAME --async`,
    or the header `Prefer: respond-async`), when a sync call runs past the gateway's
    wait limit (the client gets 303 to its result), or when it carries an
    Idempotency-Key. Results are kept for the gateway's result_ttl_seconds."""


@inv.command("get")
@click.argument("invocation_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON document.")
def inv_get(invocation_id: str, as_json: bool) -> None:
    """Status, timings, webhook delivery and result of invocation ID (also `show`)."""
    doc = _get(Client(), invocation_id)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    timings = doc.get("timings") or {}
    lines = [
        ("id", doc["id"]), ("function", doc["function"]), ("status", doc["status"]),
        ("priority", doc.get("priority", "")),
        ("created", _when(doc.get("created_at"))), ("started", _when(doc.get("started_at"))),
        ("finished", _when(doc.get("finished_at"))),
        ("queued", _seconds(timings.get("queued_seconds"))),
        ("ran", _seconds(timings.get("run_seconds"))),
        ("start", doc.get("start") or ""), ("expires", _when(doc.get("expires_at"))),
    ]
    if doc.get("error"):
        lines.append(("error", f"{doc['error']['code']}: {doc['error']['message']}"))
    hook = doc.get("webhook")
    if hook:
        lines.append(("webhook", hook["url"]))
        lines.append(("delivery", _delivery(hook)))
    if "result_status" in doc:
        lines.append(("answer", f"{doc['result_status']} {doc.get('result_content_type', '')}"
                                f" ({format_size(doc.get('result_bytes', 0))})"))
    for label, value in lines:
        if value != "":
            click.echo(f"{label:<9} {value}")
    if "result" in doc:
        click.echo(json.dumps(doc["result"], indent=2))
    elif "result_status" in doc:
        # Not JSON, or too large to inline: the raw answer is a command away.
        click.echo(f"(`thaw inv result {doc['id']}` prints the answer as it is)")


inv.add_command(inv_get, "show")


def _delivery(hook: dict[str, Any]) -> str:
    """A webhook's delivery state: e.g. `pending, 2 attempts, last answer 503, next at
    ...: the receiver answered 503`."""
    parts = [hook["state"], f"{hook['attempts']} attempt{'' if hook['attempts'] == 1 else 's'}"]
    if hook.get("last_status"):
        parts.append(f"last answer {hook['last_status']}")
    if hook.get("last_attempt_at"):
        parts.append(f"last tried {_when(hook['last_attempt_at'])}")
    if hook.get("next_attempt_at"):
        parts.append(f"next at {_when(hook['next_attempt_at'])}")
    error = f": {hook['error']}" if hook.get("error") else ""
    return ", ".join(parts) + error


@inv.command("ls")
@click.option("--status", type=click.Choice(STATUSES), default=None,
              help="Only invocations in this state.")
@click.option("--function", default=None, help="Only this function's.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True,
              help="How many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inv_ls(status: str | None, function: str | None, limit: int, as_json: bool) -> None:
    """Your recent stored invocations, newest first."""
    params: dict[str, str | int] = {"limit": limit}
    if status:
        params["status"] = status
    if function:
        params["function"] = function
    found = Client().request("GET", "/v1/invocations", params=params).json()["invocations"]
    if as_json:
        print_table(found, [], as_json=True)
        return
    rows: list[dict[str, object]] = [{
        "id": i["id"], "function": i["function"], "status": i["status"],
        "priority": i.get("priority", ""), "created": _when(i.get("created_at")),
        "queued": _seconds((i.get("timings") or {}).get("queued_seconds")),
        "ran": _seconds((i.get("timings") or {}).get("run_seconds")),
        "error": (i.get("error") or {}).get("code", "")} for i in found]
    print_table(rows, ["id", "function", "status", "priority", "created", "queued", "ran",
                       "error"], as_json=False)


@inv.command("cancel")
@click.argument("invocation_id", metavar="ID")
def inv_cancel(invocation_id: str) -> None:
    """Cancel invocation ID: a queued one never runs, a running one is cut."""
    doc = Client().request("POST", f"/v1/invocations/{invocation_id}/cancel").json()
    click.echo(f"{doc['id']}: {doc['status']}")


@inv.command("result")
@click.argument("invocation_id", metavar="ID")
@click.option("--no-wait", is_flag=True,
              help="Fail at once if it still runs, instead of waiting for it.")
def inv_result(invocation_id: str, no_wait: bool) -> None:
    """Print the answer of invocation ID to stdout as the function gave it (raw bytes).

    Waits while it runs. A failed invocation's answer is an error (exit 1)."""
    client = Client(timeout=RESULT_REQUEST_TIMEOUT)
    headers = {"Prefer": "wait=0"} if no_wait else {}
    path = f"/v1/invocations/{invocation_id}/result"
    while True:
        resp = client.request("GET", path, headers=headers)
        if resp.status_code != 303:
            break
        if no_wait:
            raise ThawError(f"invocation {invocation_id} is still "
                            f"{resp.json().get('status', 'running')}")
        time.sleep(0.1)  # the gateway already held the request for its wait limit
    sys.stdout.buffer.write(resp.content)
    sys.stdout.buffer.flush()
