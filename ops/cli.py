"""The `thaw` command: one group, one module per command group."""

from __future__ import annotations

import os
import sys

import click
import structlog

from thaw.core.errors import ThawError
from thaw.ops.audit import audit
from thaw.ops.bench import bench
from thaw.ops.blobstore import blobstore
from thaw.ops.chat import chat
from thaw.ops.config import CREDENTIALS_HELP, login
from thaw.ops.doctor import doctor
from thaw.ops.environments import env
from thaw.ops.functions import deploy, fn, invoke
from thaw.ops.images import image
from thaw.ops.invocations import inv
from thaw.ops.logs import fn_logs
from thaw.ops.mcp import mcp
from thaw.ops.nodes import node
from thaw.ops.pki import pki
from thaw.ops.schedules import schedule
from thaw.ops.secrets import secret
from thaw.ops.services import agent, gateway, scheduler, up
from thaw.ops.settings import config_group
from thaw.ops.snapshots import snapshot
from thaw.ops.tenants import key, tenant
from thaw.ops.top import top
from thaw.ops.usage import usage
from thaw.ops.volumes import volume
from thaw.ops.webhooks import webhook

# Exit codes: 1 = the platform said no (a ThawError), 2 = bad usage (click's own).
EXIT_ERROR = 1


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             epilog=CREDENTIALS_HELP)
@click.version_option(package_name="thaw")
@click.option("--profile", default="", envvar="THAW_PROFILE",
              help="Use [profiles.NAME] of the config file.")
def cli(profile: str) -> None:
    """thaw: serverless GPU functions whose cold start is a snapshot restore."""
    # Log records of the CLI's own process go to stderr: stdout is the command's output
    # (`thaw bench` prints JSON there). The services configure their own logging.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    if profile:
        os.environ["THAW_PROFILE"] = profile  # read by ops/config.py credentials()


for command in (up, scheduler, gateway, agent, deploy, invoke, fn, snapshot, node, bench,
                image, login, top, usage, inv, config_group, doctor, pki):
    cli.add_command(command)
fn.add_command(fn_logs)
for command in (key, tenant, audit):  # tenancy: ops/tenants.py, ops/audit.py
    cli.add_command(command)
cli.add_command(webhook)  # ops/webhooks.py
cli.add_command(secret)  # ops/secrets.py
cli.add_command(volume)  # ops/volumes.py
cli.add_command(env)  # ops/environments.py
cli.add_command(mcp)  # ops/mcp.py
cli.add_command(chat)  # ops/chat.py
cli.add_command(schedule)  # ops/schedules.py
cli.add_command(blobstore)  # ops/blobstore.py


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ThawError as exc:
        # str(): an API error reads "404: no function named 'x'" (thaw.client.errors).
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"error: {exc.strerror or exc}{where}", err=True)
        sys.exit(EXIT_ERROR)
    except Exception as exc:
        # A bug, not a refusal: one line without the exception's class, the traceback
        # on request.
        if os.environ.get("THAW_DEBUG"):
            raise
        click.echo(f"error: unexpected failure: {exc or 'no detail'} (THAW_DEBUG=1 "
                   "shows the traceback)", err=True)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
