"""`thaw webhook secret [--rotate]`: the tenant's webhook signing secret, through
/v1/webhooks/secret (an admin key). Every webhook delivery is signed with it (Standard
Webhooks: docs/webhooks.md says how a receiver checks it)."""

from __future__ import annotations

import datetime
import json

import click

from thaw.ops.client import Client


@click.group("webhook")
def webhook() -> None:
    """Webhooks of stored invocations (X-Thaw-Webhook): their signing secret."""


@webhook.command("secret")
@click.option("--rotate", is_flag=True,
              help="Make a new secret; the previous one keeps signing beside it for a day.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON document.")
def webhook_secret(rotate: bool, as_json: bool) -> None:
    """Print your tenant's webhook signing secret (whsec_...), made on first use.

    Receivers verify the webhook-signature header with it (HMAC-SHA256 of
    "webhook-id.webhook-timestamp.body"). Keep it as you keep an API key."""
    path = "/v1/webhooks/secret/rotate" if rotate else "/v1/webhooks/secret"
    doc = Client().request("POST" if rotate else "GET", path).json()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(doc["secret"])
    until = doc.get("previous_secret_until")
    if until:
        when = datetime.datetime.fromtimestamp(until).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"# the previous secret also signs deliveries until {when}", err=True)
