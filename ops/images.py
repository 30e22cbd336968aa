"""`thaw image build|show`: the docker runtime's base image, built on this machine
(debootstrap from the machine's own apt mirror, then `docker import`; nothing is
pulled). Needs root and a running engine."""

from __future__ import annotations

import time

import click

from thaw.core.errors import ThawError


@click.group()
def image() -> None:
    """Build or show the base image of the docker runtime."""


@image.command("build")
@click.option("--tag", default=None, help="Image tag (default thaw/base:<suite>).")
@click.option("--force", is_flag=True, help="Rebuild even if the tag exists.")
def image_build(tag: str | None, force: bool) -> None:
    """Build the base image (minutes the first time; an existing tag is kept)."""
    from thaw.platform import images

    client = images.docker_client()
    source = images.find_apt_source()
    click.echo(f"base image from {source.uri} {source.suite} (debootstrap, minbase)…")
    started = time.perf_counter()
    built = images.ensure_base_image(client, tag=tag, source=source, force=force)
    python = images.image_python(client, built)
    click.echo(f"{built} (python {python or 'unknown'}) ready in "
               f"{time.perf_counter() - started:.1f}s")


@image.command("show")
@click.option("--tag", default=None, help="Image tag (default thaw/base:<suite>).")
def image_show(tag: str | None) -> None:
    """Print the base image's tag and Python version, or fail if it is not built."""
    from thaw.platform import images

    client = images.docker_client()
    tag = tag or images.image_tag(images.find_apt_source().suite)
    try:
        python = images.image_python(client, tag)
    except ThawError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{tag} python {python or 'unknown'}")
