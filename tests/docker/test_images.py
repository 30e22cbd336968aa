"""The base image: where it is built from (the machine's own apt sources), and the
image itself (built once per machine, then reused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from thaw.platform import images

MIRROR = "http://mirror.invalid/debian"


def test_apt_source_from_deb822(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list.d"
    sources.mkdir()
    (sources / "a-disabled.sources").write_text(
        f"Types: deb\nURIs: {MIRROR}-off\nSuites: sid\nEnabled: no\n")
    (sources / "debian.sources").write_text(
        "Types: deb-src\nURIs: http://src.invalid/debian\nSuites: trixie\n\n"
        f"# a comment\nTypes: deb\nURIs: {MIRROR}\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    (sources / "other.list.disabled").write_text("deb http://no.invalid/x stable main\n")
    source = images.find_apt_source(tmp_path / "sources.list", sources)
    assert source == images.AptSource(MIRROR, "bookworm")


def test_apt_source_from_one_line_list_first(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list.d"
    sources.mkdir()
    (sources / "debian.sources").write_text(f"Types: deb\nURIs: {MIRROR}\nSuites: trixie\n")
    listing = tmp_path / "sources.list"
    listing.write_text("# deb http://commented.invalid/debian sid main\n"
                       "deb-src http://src.invalid/debian bookworm main\n"
                       f"deb [arch=amd64 signed-by=/k.gpg] {MIRROR} bullseye main\n")
    assert images.find_apt_source(listing, sources) == images.AptSource(MIRROR, "bullseye")


def test_no_apt_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(images.ImageBuildError, match="no deb source"):
        images.find_apt_source(tmp_path / "sources.list", tmp_path / "none")


@pytest.mark.docker
def test_base_image_is_built_locally_and_reused(docker_client: Any, base_image: str) -> None:
    source = images.find_apt_source()
    assert base_image == images.image_tag(source.suite)
    image = docker_client.images.get(base_image)
    assert image.attrs["Config"]["Labels"][images.LABEL_SUITE] == source.suite
    # Built by import, never pulled: no registry digest.
    assert not image.attrs.get("RepoDigests")
    python = images.image_python(docker_client, base_image)
    assert python.startswith("3.") and python.count(".") == 2
    # Cached: a second call finds the tag and builds nothing.
    assert images.ensure_base_image(docker_client) == base_image
    out = docker_client.containers.run(
        base_image, ["python3", "-c", "import sys; print(sys.version_info[:2])"],
        remove=True, network_mode="none")
    assert out.decode().strip() == str(tuple(int(v) for v in python.split(".")[:2]))
