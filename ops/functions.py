"""`thaw deploy`, `thaw invoke`, `thaw fn ...`: what a tenant does."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import httpx

from thaw.client.sse import EventReader
from thaw.core.bundle import MAX_BUNDLE_BYTES
from thaw.core.errors import BundleTooLarge
from thaw.core.units import format_size
from thaw.ops.client import Client
from thaw.ops.deploy_progress import step_line
from thaw.ops.output import console, print_table


@click.command()
@click.argument("target", metavar="PATH|IMAGE|ARCHIVE")
@click.option("--no-wait", is_flag=True, help="Return once uploaded, before the snapshot build.")
@click.option("--dry-run", is_flag=True,
              help="Check the bundle and thaw.toml here (the schema, the bundle limits), "
                   "print what would be deployed, upload nothing.")
@click.option("--force", is_flag=True,
              help="A new version even when the bundle is the one serving (it is "
                   "built again); without it an unchanged folder keeps its version.")
@click.option("--name", default=None,
              help="The function's name, for a cog folder (cog.yaml, no thaw.toml; "
                   "default: the folder's name).")
def deploy(target: str, no_wait: bool, dry_run: bool, force: bool, name: str | None
           ) -> None:
    """Upload a function and print its URL.

    PATH is a bundle folder (with thaw.toml). Anything else is an IMAGE on the local
    docker engine (repo:tag or id) holding the bundle folder at the path its label
    org.thaw.bundle names (default /app) and the packages the code needs: its folder
    is uploaded with [runtime] image pinned to the image's id, and the function runs
    in that image on nodes with THAW_RUNTIME=docker (which must have the image).
    A file is an ARCHIVE, what `docker save` writes (plain or gzip'd): its bundle
    folder is read from its layers, and the archive is uploaded once so that each
    docker node lacking the image loads it (docs/images.md).

    Bundles pack reproducibly, so redeploying an unchanged folder (thaw.toml
    included) prints "unchanged, version N kept" and builds nothing (--force builds
    a new version anyway).

    A progress bar shows the upload (bytes, speed), then the snapshot build.
    --dry-run checks everything that can be checked here and uploads nothing
    (docs/thaw-toml.md).

    A cog folder (cog.yaml and predict.py, no thaw.toml) deploys as it is: thaw.toml
    is written into the packed copy, named after the folder or --name (docs/cog.md)."""
    from thaw.ops.cog_bundle import as_bundle, build_notes
    from thaw.ops.image_deploy import deploy_target

    with contextlib.ExitStack() as stack:
        found = deploy_target(target)
        if isinstance(found, Path):
            note = build_notes(found)
            if note:
                click.echo(note, err=True)
            found = stack.enter_context(as_bundle(found, name))
        elif name is not None:
            raise click.UsageError("--name is for a cog folder (cog.yaml, no thaw.toml)")
        _deploy_found(found, no_wait, dry_run, force)


def _deploy_found(found: Any, no_wait: bool, dry_run: bool, force: bool) -> None:
    from thaw.ops.image_deploy import (
        bundle_from_folder,
        bundle_from_image,
        upload_image_archive,
    )
    from thaw.ops.uploads import deploy_chunked, pack_large

    if dry_run:
        from thaw.ops.deploy_check import dry_run as check

        check(found)
        return
    if isinstance(found, Path):
        try:
            bundle = bundle_from_folder(found)
        except BundleTooLarge:
            # Past the single request's cap: packed under the tenant's max_bundle_bytes
            # and sent as chunks the platform lacks (docs/volumes.md).
            bundle = pack_large(Client(), found)
        label = found.name
    else:
        from_image = bundle_from_image(found)
        bundle, label = from_image.data, found
        click.echo(f"{from_image.bundle_path} of {from_image.image}", err=True)
        upload_image_archive(from_image)
    uploaded: list[float] = []
    started = time.perf_counter()
    if len(bundle) > MAX_BUNDLE_BYTES:
        from thaw.ops.deploy_progress import BuildWatch

        # While the request waits for the build, each new step is a line.
        watch = BuildWatch(lambda line: click.echo(line, err=True), bundle=bundle)

        def chunks_sent() -> None:
            uploaded.append(time.perf_counter() - started)
            if not no_wait:
                watch.start()

        try:
            report = deploy_chunked(Client(), bundle, wait=not no_wait, force=force,
                                    on_uploaded=chunks_sent)
        finally:
            watch.stop()
        click.echo(f"sent {report.chunks_sent} of {report.chunks_total} chunks "
                   f"({format_size(report.bytes_sent)})", err=True)
        fn = report.result
    else:
        fn = _deploy_whole(bundle, label, no_wait, force, uploaded, started)
    seconds = uploaded[0] if uploaded else 0.0
    _report(fn, len(bundle), seconds, time.perf_counter() - started - seconds, no_wait)


def _report(fn: dict[str, Any], size: int, upload_seconds: float, build_seconds: float,
            no_wait: bool) -> None:
    """What the deploy did, in words: kept unchanged, queued (--no-wait), built and
    serving, or failed (exit 1) and which version serves instead. The URL is the last
    line of stdout whenever the function has one."""
    name, version = fn["name"], fn["version"]
    if fn.get("unchanged"):
        # The same bytes as the serving version (bundles pack reproducibly).
        click.echo(f"uploaded {format_size(size)} in {upload_seconds:.2f}s, nothing to "
                   "build", err=True)
        console.print(f"[bold]{name}[/] unchanged, version {version} kept "
                      f"(nothing built): {fn['state']} ({fn['start_mode']} starts)")
        click.echo(fn["url"])
        return
    latest = fn.get("latest_build") or {}
    if no_wait and fn["state"] != "failed" and latest.get("state") != "failed":
        click.echo(f"uploaded {format_size(size)} in {upload_seconds:.2f}s; the snapshot "
                   "build goes on without this command", err=True)
        building = latest.get("version", version)
        console.print(f"[bold]{name}[/] v{building}: uploaded, {latest.get('state') or fn['state']}"
                      f" (not waited for: `thaw fn status {name}` shows when it is ready)")
        click.echo(fn["url"])
        return
    click.echo(f"uploaded {format_size(size)} in {upload_seconds:.2f}s, built in "
               f"{build_seconds:.1f}s", err=True)
    console.print(f"[bold]{name}[/] v{version}: {fn['state']} ({fn['start_mode']} starts)")
    if fn.get("reason"):
        console.print(f"  {fn['reason']}")
    click.echo(fn["url"])
    if latest.get("state") == "failed" and fn["state"] == "ready":
        # A redeploy whose build failed: the version that served before still does.
        console.print(f"  version {latest['version']} failed to build: {latest['reason']}; "
                      f"version {version} still serves")
    if fn["state"] == "failed" or latest.get("state") == "failed":
        click.echo(f"error: the deploy failed: the build of {name} did not finish "
                   f"(`thaw fn logs {name}` shows its output)"
                   + ("" if fn["state"] == "ready" else "; no version of it serves"),
                   err=True)
        sys.exit(1)


def _deploy_whole(bundle: bytes, label: str, no_wait: bool, force: bool,
                  uploaded: list[float], started: float) -> Any:
    """One POST of the whole bundle under a progress bar; the upload's seconds are
    appended to `uploaded` once its last byte is sent."""
    from thaw.ops.client import DEPLOY_TIMEOUT
    from thaw.ops.deploy_progress import BuildWatch
    from thaw.ops.progress import transfer_progress, upload_pieces

    with transfer_progress(transient=True) as progress:
        task = progress.add_task(f"uploading {label}", total=len(bundle))
        # While the request waits for the build, the build's current step is shown.
        watch = BuildWatch(lambda line: progress.update(task, description=line),
                           bundle=bundle)

        def pieces() -> Iterator[bytes]:
            yield from upload_pieces(bundle, progress, task)
            uploaded.append(time.perf_counter() - started)
            if not no_wait:
                progress.update(task, description="building the snapshot (setup, capture)")
                watch.start()

        try:
            return Client().request(
                "POST", "/v1/functions",
                params={"wait": str(not no_wait).lower(), "force": str(force).lower()},
                content=pieces(), timeout=DEPLOY_TIMEOUT,
                headers={"Content-Type": "application/gzip",
                         "Content-Length": str(len(bundle))}).json()
        finally:
            watch.stop()


@click.command()
@click.argument("name")
@click.option("--data", "-d", default="{}", metavar="JSON|@FILE|-",
              help="The body: JSON text, @FILE for a file's bytes, - for stdin. "
                   "Default: {}.")
@click.option("--path", "sub_path", default="", metavar="SUB",
              help="Call the function's sub-path SUB (/fn/TENANT/NAME/SUB).")
@click.option("--header", "-H", "header_lines", multiple=True, metavar="K:V",
              help="A request header, e.g. -H 'Content-Type: text/plain' (repeatable).")
@click.option("--stream", is_flag=True, help="Ask for Server-Sent Events and print them.")
@click.option("--priority", type=click.IntRange(1, 100), default=None,
              help="1-100 (X-Thaw-Priority, up to the key's priority_max): the call's "
                   "place among the function's queued calls; default: the function's, "
                   "else the key's.")
@click.option("--async", "run_async", is_flag=True,
              help="Queue the call and return at once (Prefer: respond-async): prints "
                   "the invocation's id and URL; see `thaw inv`.")
def invoke(name: str, data: str, sub_path: str, header_lines: tuple[str, ...],
           stream: bool, priority: int | None, run_async: bool) -> None:
    """Call function NAME of your tenant (POST, a JSON body unless -H says otherwise)."""
    if stream and run_async:
        raise click.UsageError("--stream and --async exclude each other (an async "
                               "invocation's result is its whole output: thaw inv result)")
    body = read_body(data)
    headers = {"Content-Type": "application/json", **parse_headers(header_lines)}
    client = Client(timeout=600)
    fns = {f["name"]: f for f in client.request("GET", "/v1/functions").json()["functions"]}
    if name not in fns:
        raise click.ClickException(f"no function named {name!r}")
    path = "/fn/" + fns[name]["url"].split("/fn/", 1)[1]
    if sub_path.strip("/"):
        path += "/" + sub_path.strip("/")
    if priority is not None:
        headers["X-Thaw-Priority"] = str(priority)
    if run_async:
        from thaw.ops.invocations import submit_async

        submit_async(client, path, body, headers)
        return
    if stream:
        headers["Accept"] = "text/event-stream"
        with client.stream("POST", path, content=body, headers=headers) as resp:
            print_stream(resp)
            click.echo(f"# start={resp.headers.get('X-Thaw-Start')}", err=True)
        return
    resp = client.request("POST", path, content=body, headers=headers)
    click.echo(resp.text.rstrip("\n"))
    click.echo(f"# start={resp.headers.get('X-Thaw-Start')} "
               f"timing={resp.headers.get('Server-Timing')}", err=True)


def read_body(data: str) -> bytes:
    """-d's body: `-` is stdin, `@FILE` a file's bytes, anything else the text itself."""
    if data == "-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        path = Path(data[1:]).expanduser()
        try:
            return path.read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc.strerror or exc}",
                                     param_hint="'--data'") from exc
    return data.encode()


def parse_headers(lines: tuple[str, ...]) -> dict[str, str]:
    """-H 'Key: value' lines as a dict; a line without a colon or a name is refused."""
    headers: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if not sep or not key.strip() or any(c.isspace() for c in key.strip()):
            raise click.BadParameter(f"{line!r} is not K:V", param_hint="'--header'")
        headers[key.strip()] = value.strip()
    return headers


def print_stream(resp: httpx.Response) -> None:
    """Print a streamed answer as it arrives: each SSE `data:` payload on its own line
    (an `event: error` ends it with an error), other streams line by line."""
    if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        for line in resp.iter_lines():
            click.echo(line)
        return
    reader = EventReader()
    for line in resp.iter_lines():
        payload = reader.feed(line)
        if reader.done:
            return
        if payload is not None:
            click.echo(payload)


@click.group()
def fn() -> None:
    """List functions, tail their logs, list their versions, roll back, remove."""


@fn.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def fn_ls(as_json: bool) -> None:
    """List your functions."""
    rows = Client().request("GET", "/v1/functions").json()["functions"]
    print_table(rows, ["name", "version", "state", "start_mode", "warm_instances", "url"],
                as_json)


@fn.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the function's JSON.")
def fn_status(name: str, as_json: bool) -> None:
    """Function NAME: its serving version, state, start mode, warm instances and URL,
    the step of a build running now (e.g. "building v3: running setup()"), then any
    warning about how the nodes would run it (e.g. "gpu_compute not enforced"
    where no MPS daemon applies its share)."""
    doc = Client().request("GET", f"/v1/functions/{name}").json()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    rows: list[dict[str, object]] = [{
        "name": doc["name"], "version": doc["version"], "state": doc["state"],
        "start_mode": doc["start_mode"], "warm_instances": doc["warm_instances"],
        "url": doc["url"]}]
    print_table(rows, ["name", "version", "state", "start_mode", "warm_instances", "url"],
                as_json=False)
    if doc.get("reason"):
        click.echo(f"reason: {doc['reason']}")
    step = step_line(doc)
    if step is not None:
        click.echo(step)
    for warning in doc.get("warnings") or []:
        click.echo(f"warning: {warning}")
    for line in schedule_lines(doc):
        click.echo(line)


def schedule_lines(doc: dict[str, Any]) -> list[str]:
    """One line per cron schedule of the function (docs/schedules.md)."""
    lines = []
    for sched in doc.get("schedules") or []:
        when = ("disabled" if not sched["enabled"] else "next run " + time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(sched["next_run_at"])))
        lines.append(f"schedule: {sched['cron']} ({sched['timezone']}), {when}, "
                     f"input {json.dumps(sched['input'])}")
    return lines


fn.add_command(fn_status, "show")


@fn.command("rm")
@click.argument("name")
def fn_rm(name: str) -> None:
    """Delete function NAME and stop its instances."""
    Client().request("DELETE", f"/v1/functions/{name}")
    click.echo(f"deleted {name}")


def _when(unix: float | None) -> str:
    import datetime

    if not unix:
        return ""
    return datetime.datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S")


@fn.command("versions")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def fn_versions(name: str, as_json: bool) -> None:
    """List every version (one per deploy) of function NAME, newest first; `*` marks
    the one serving. Versions whose snapshot is kept roll back instantly."""
    versions = Client().request("GET", f"/v1/functions/{name}/versions").json()["versions"]
    if as_json:
        print_table(versions, [], as_json=True)
        return
    rows: list[dict[str, object]] = [{
        "active": "*" if v["active"] else "", "version": v["version"], "state": v["state"],
        "digest": v["bundle_digest"][:12], "snapshot": v["snapshot"] or v["start_mode"],
        "snapshot bytes": v["snapshot_bytes"], "created": _when(v["created_at"]),
        "reason": v["reason"]} for v in versions]
    print_table(rows, ["active", "version", "state", "digest", "snapshot", "snapshot bytes",
                       "created", "reason"], as_json=False)


@fn.command("rollback")
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1), required=False)
def fn_rollback(name: str, version: int | None) -> None:
    """Serve VERSION of function NAME again (default: the newest ready version before
    the serving one). Instant when its snapshot is kept; else it is rebuilt from its
    bundle first, while the serving version keeps serving."""
    from thaw.ops.client import DEPLOY_TIMEOUT

    body = {"version": version} if version is not None else {}
    reply = Client().request("POST", f"/v1/functions/{name}/rollback", json=body,
                             timeout=DEPLOY_TIMEOUT).json()
    console.print(f"[bold]{name}[/] v{reply['version']}: {reply['message']}")
