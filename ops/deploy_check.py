"""`thaw deploy --dry-run`: a bundle checked as the platform would check it, without
uploading it. The folder (or image) is packed as a deploy packs it, read back through
the same streaming limits (core/bundle.py) and its thaw.toml validated against the
schema (core/spec.py); then what would be deployed is printed.

What only the platform knows (the tenant's quota, the largest node) is checked at the
real deploy; when the gateway answers, its published schema is compared with this
CLI's, so a CLI of another version says so instead of promising what the server may
refuse."""

from __future__ import annotations

from pathlib import Path

import click
import httpx

from thaw.core.spec import FunctionSpec, scan_bundle, spec_of, thaw_toml_schema
from thaw.core.units import format_size
from thaw.ops.client import gateway_url

# The dry run must not hang on a gateway that is away: its check is optional.
SCHEMA_FETCH_SECONDS = 3.0
SCHEMA_ROUTE = "/v1/schema/thaw.toml"


def _seconds(value: float) -> str:
    return f"{value * 1000:g}ms" if 0 < value < 1 else f"{value:g}s"


def describe(spec: FunctionSpec) -> list[tuple[str, str]]:
    """What a deploy of `spec` asks for, one (heading, text) per thaw.toml table."""
    res, sc, bt = spec.resources, spec.scaling, spec.batching
    gpu = format_size(res.gpu_memory) + " slice" if res.gpu_memory else "none (CPU only)"
    if res.gpu_compute:
        gpu += f", {res.gpu_compute}% of SMs"
    return [
        ("resources", f"GPU memory {gpu}; host memory "
                      f"{format_size(res.memory) if res.memory else 'not limited'}"),
        ("scaling", f"{sc.min_instances} to {sc.max_instances} instances, "
                    f"{sc.target_concurrency} calls each aimed at ({sc.max_concurrency} at "
                    f"most); idle ones stop after {_seconds(sc.scaledown_window)}; "
                    f"timeout {_seconds(sc.timeout)}"),
        ("starts", "restored from a snapshot" if spec.snapshot else
                   "fresh (snapshots disabled)"),
        ("batching", f"up to {bt.max_batch_size} calls, waiting {bt.max_batch_wait_ms:g} ms"
                     if bt.max_batch_size > 1 else "off"),
        ("body limit", format_size(spec.limits.max_body) if spec.limits.max_body
                       else "the gateway's"),
        ("runtime", f"image {spec.runtime.image}" if spec.runtime.image
                    else "the node's environment"),
        ("network", spec.runtime.network),
    ]


def server_note(url: str) -> str:
    """One line on the gateway's schema: the same as this CLI's, another, or away."""
    try:
        resp = httpx.get(url + SCHEMA_ROUTE, timeout=SCHEMA_FETCH_SECONDS)
    except httpx.HTTPError as exc:
        return f"gateway {url} not reachable ({type(exc).__name__}): checked here only"
    if resp.status_code != 200:
        return f"gateway {url} serves no thaw.toml schema ({resp.status_code}): checked here only"
    try:
        same = resp.json() == thaw_toml_schema()
    except ValueError:
        same = False
    if same:
        return f"gateway {url} publishes the same thaw.toml schema"
    return (f"gateway {url} publishes another thaw.toml schema (another thaw version): "
            "the deploy may be judged differently there")


def dry_run(found: Path | str, url: str | None = None) -> None:
    """Pack, check and describe a deploy target (a folder, or an image reference)."""
    from thaw.ops.image_deploy import bundle_from_folder, bundle_from_image

    if isinstance(found, Path):
        data, label = bundle_from_folder(found), str(found)
    else:
        from_image = bundle_from_image(found)
        data, label = from_image.data, f"{from_image.bundle_path} of {from_image.image}"
    scan = scan_bundle(data)
    spec = spec_of(scan)
    click.echo(f"{label}: would deploy {spec.name} (handler {spec.handler})")
    click.echo(f"  {'bundle':<11} {scan.members} entries, {format_size(scan.unpacked_bytes)} "
               f"unpacked, {format_size(scan.packed_bytes)} to upload")
    for heading, text in describe(spec):
        click.echo(f"  {heading:<11} {text}")
    click.echo("valid: thaw.toml's schema and the bundle limits hold; the tenant's quota "
               "and the largest node are checked at deploy")
    click.echo(server_note(url or gateway_url()))
