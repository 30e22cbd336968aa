"""The `docker save` archive reader (core/image_archive.py) and the bundle folder
read out of its layers (ops/image_archive.py, ops/image_deploy.py), on archives made
in memory: docker's layout (config `<hex>.json` or `blobs/sha256/<hex>`), the OCI
layout (index.json, nested), gzip'd or not; tampered, damaged and foreign files
refused naming what is wrong."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.archives import (
    bundle_layer,
    config_of,
    docker_archive,
    oci_archive,
    tar_of,
    write,
)
from thaw.core.errors import ThawError
from thaw.core.image_archive import (
    ImageArchiveError,
    config_digest,
    image_hex,
    read_image,
)
from thaw.core.spec import parse_spec
from thaw.ops.image_archive import bundle_tree
from thaw.ops.image_deploy import BUNDLE_LABEL, bundle_from_archive, bundle_from_image


def toml_of(data: bytes) -> str:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        handle = tar.extractfile("thaw.toml")
        assert handle is not None
        return handle.read().decode()


@pytest.mark.parametrize("blobs", [False, True], ids=["hex.json", "blobs"])
@pytest.mark.parametrize("gz", [False, True], ids=["tar", "gzip"])
def test_docker_layout_gives_the_config_digest(tmp_path: Path, blobs: bool,
                                               gz: bool) -> None:
    data, image_id = docker_archive([bundle_layer()], labels={"x": "y"}, blobs=blobs)
    image = read_image(write(tmp_path / "image.tar", data, gz=gz))
    assert image.image_id == image_id
    assert image.labels == {"x": "y"}
    assert image.repo_tags == ("tenant/app:v1",)
    assert len(image.layers) == 1


@pytest.mark.parametrize("nested", [False, True], ids=["index", "nested-index"])
def test_oci_layout_is_followed_to_its_config(tmp_path: Path, nested: bool) -> None:
    data, image_id = oci_archive([bundle_layer()], nested=nested, name="reg/img:v2")
    image = read_image(write(tmp_path / "image.tar", data))
    assert image.image_id == image_id
    assert image.repo_tags == ("reg/img:v2",)
    assert all(layer.startswith("blobs/sha256/") for layer in image.layers)


def test_a_tampered_config_is_refused(tmp_path: Path) -> None:
    original = config_of()
    claimed = __import__("hashlib").sha256(original).hexdigest()
    forged = config_of({"evil": "1"})
    data, _ = docker_archive([bundle_layer()], config=forged, config_digest=claimed)
    with pytest.raises(ImageArchiveError,
                       match=f"tampered with or damaged: {claimed}.json hashes to "
                             f"sha256:[0-9a-f]{{64}}, not the sha256:{claimed}"):
        read_image(write(tmp_path / "image.tar", data))


def test_refusals_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ImageArchiveError, match="not a docker save archive"):
        read_image(write(tmp_path / "a.txt", b"hello, not a tar\n" * 50))
    with pytest.raises(ImageArchiveError, match="has neither manifest.json nor index.json"):
        read_image(write(tmp_path / "b.tar", tar_of({"x": b"1"})))
    two, _ = docker_archive([bundle_layer()], images=2)
    with pytest.raises(ImageArchiveError, match="holds 2 images: save one"):
        read_image(write(tmp_path / "c.tar", two))
    missing = tar_of({"manifest.json": json.dumps(
        [{"Config": f"{'a' * 64}.json", "Layers": []}]).encode()})
    with pytest.raises(ImageArchiveError, match="which the archive lacks"):
        read_image(write(tmp_path / "d.tar", missing))
    bad_name = tar_of({"manifest.json": b'[{"Config": "config.json", "Layers": []}]'})
    with pytest.raises(ImageArchiveError, match="names no sha256 digest"):
        read_image(write(tmp_path / "e.tar", bad_name))
    with pytest.raises(ImageArchiveError, match="manifest.json is not JSON"):
        read_image(write(tmp_path / "f.tar", tar_of({"manifest.json": b"{"})))
    # A truncated archive: its config is cut off half-way.
    whole, _ = docker_archive([bundle_layer()])
    with pytest.raises(ImageArchiveError):
        read_image(write(tmp_path / "g.tar", whole[:len(whole) // 2]))


def test_digest_names() -> None:
    assert config_digest(f"{'ab' * 32}.json") == f"sha256:{'ab' * 32}"
    assert config_digest(f"blobs/sha256/{'cd' * 32}") == f"sha256:{'cd' * 32}"
    assert image_hex(f"sha256:{'0' * 64}") == "0" * 64
    with pytest.raises(ThawError, match="sha256:<64 lowercase hex>"):
        image_hex("sha256:ABC")


def test_layers_merge_with_whiteouts(tmp_path: Path) -> None:
    lower = tar_of({"app": None, "app/thaw.toml": b"old", "app/gone.py": b"x",
                    "app/sub": None, "app/sub/a.py": b"a", "etc/other": b"outside"})
    upper = tar_of({"app/thaw.toml": b"new", "app/.wh.gone.py": b"",
                    "app/sub/.wh..wh..opq": b"", "app/sub/b.py": b"b"})
    data, _ = docker_archive([lower, upper])
    path = write(tmp_path / "image.tar", data)
    tree = bundle_tree(path, read_image(path), "/app", 1 << 20)
    files = {k: v.data for k, v in tree.items() if v.kind == "file"}
    assert files == {"thaw.toml": b"new", "sub/b.py": b"b"}


def test_the_bundle_folder_is_bounded(tmp_path: Path) -> None:
    data, _ = docker_archive([tar_of({"app/big.bin": b"x" * 5000,
                                      "app/thaw.toml": b"t"})])
    path = write(tmp_path / "image.tar", data)
    with pytest.raises(ThawError, match="bundle folder /app is larger than 4096 bytes"):
        bundle_tree(path, read_image(path), "/app", 4096)


@pytest.mark.parametrize("oci", [False, True], ids=["docker", "oci"])
def test_bundle_from_archive_pins_the_image(tmp_path: Path, oci: bool) -> None:
    layer = bundle_layer("srv/fn")
    labels = {BUNDLE_LABEL: "/srv/fn"}
    data, image_id = (oci_archive([layer], labels=labels) if oci
                      else docker_archive([layer], labels=labels))
    path = write(tmp_path / "image.tar.gz", data, gz=True)
    found = bundle_from_image(str(path))
    assert found.archive == path and found.bundle_path == "/srv/fn"
    assert found.image == f"tenant/app:v1@{image_id}"
    spec = parse_spec(toml_of(found.data))
    assert spec.name == "arc" and spec.runtime.image_id == image_id


def test_untagged_archive_is_pinned_by_id(tmp_path: Path) -> None:
    data, image_id = docker_archive([bundle_layer()], tags=())
    found = bundle_from_archive(write(tmp_path / "image.tar", data))
    assert found.image == f"@{image_id}"


def test_archive_without_the_bundle_folder(tmp_path: Path) -> None:
    data, _ = docker_archive([tar_of({"etc/hostname": b"x"})])
    with pytest.raises(ThawError, match="image archive image.tar has no /app: put the "
                                        f"bundle folder .* label {BUNDLE_LABEL}"):
        bundle_from_archive(write(tmp_path / "image.tar", data))
    data, _ = docker_archive([tar_of({"app/app.py": b""})])
    with pytest.raises(ThawError, match="has no thaw.toml in /app"):
        bundle_from_archive(write(tmp_path / "image.tar", data))


def test_a_file_replaces_a_lower_folder(tmp_path: Path) -> None:
    lower = tar_of({"app/thaw.toml": b"t", "app/lib": None, "app/lib/a.py": b"a"})
    upper = tar_of({"app/lib": b"now a file"})
    data, _ = docker_archive([lower, upper])
    path = write(tmp_path / "image.tar", data)
    tree = bundle_tree(path, read_image(path), "/app", 1 << 20)
    assert {k: v.data for k, v in tree.items()} == {"thaw.toml": b"t", "lib": b"now a file"}


def test_a_link_cannot_lead_entries_out_of_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("app/escape")
        link.type, link.linkname = tarfile.SYMTYPE, str(outside)
        tar.addfile(link)
        for name, body in (("app/escape/pwned", b"x"), ("app/thaw.toml", b"t")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    data, _ = docker_archive([buf.getvalue()])
    with pytest.raises(ThawError, match="under a link that leaves the bundle folder"):
        bundle_from_archive(write(tmp_path / "image.tar", data))
    assert not list(outside.iterdir())
