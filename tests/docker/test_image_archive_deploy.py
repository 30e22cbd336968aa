"""`thaw deploy image.tar` against the real engine: a tenant image built here FROM the
base image, `docker save`d (gzip'd too), removed from the engine, then deployed from
the archive to a platform whose agent runs the docker runtime. The agent finds the
image missing at the build, fetches the archive from the scheduler, `docker load`s it
and checks its id; the function answers from what is in the image. A tampered archive
is refused by the CLI and by the gateway."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from tests.conftest import RunningPlatform
from tests.docker.conftest import DockerPlatform, agent_containers
from tests.docker.test_image_deploy import IMAGE_MODULE_DIR, build_image
from tests.ops.test_cli import cli_env, thaw
from thaw.core.errors import ThawError
from thaw.ops.client import Client
from thaw.ops.image_deploy import bundle_from_image, upload_image_archive

pytestmark = pytest.mark.docker

REPOSITORY = "thaw-test/archivefn"


@pytest.fixture
def image_tags(docker_client: Any) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for tag in made:
        with contextlib.suppress(docker.errors.DockerException):
            docker_client.images.remove(tag, force=True)


def save(client: Any, image_id: str, path: Path, *, gz: bool) -> Path:
    """`docker save` of one image into `path` (gzip'd when asked)."""
    with open(path, "wb") as raw:
        out: Any = gzip.GzipFile(fileobj=raw, mode="wb") if gz else raw
        for chunk in client.images.get(image_id).save(named=True):
            out.write(chunk)
        if gz:
            out.close()
    return path


def tamper(source: Path, dest: Path) -> Path:
    """The archive with its config changed (a label added) under the same name: its
    manifest still names the old digest."""
    with tarfile.open(source) as tar, tarfile.open(dest, "w") as out:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        config_name = manifest[0]["Config"]
        for member in tar.getmembers():
            handle = tar.extractfile(member) if member.isfile() else None
            data = handle.read() if handle is not None else None
            if member.name == config_name and data is not None:
                config = json.loads(data)
                config["config"].setdefault("Labels", {})["forged"] = "yes"
                data = json.dumps(config).encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    return dest


def test_deploy_archive_loads_the_image_on_the_node(
        docker_platform: RunningPlatform, docker_client: Any, base_image: str,
        tmp_path: Path, image_tags: list[str]) -> None:
    tag = f"{REPOSITORY}:v1"
    image_tags.append(tag)
    image_id = build_image(docker_client, base_image, tmp_path / "ctx", tag, "from-archive",
                           toml='name = "archivefn"\nhandler = "app:FromImage"\n')
    archive = save(docker_client, image_id, tmp_path / "image.tar.gz", gz=True)
    docker_client.images.remove(image_id, force=True)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(image_id)

    found = bundle_from_image(str(archive))
    assert found.image == f"{tag}@{image_id}" and found.bundle_path == "/srv/fn"
    client = Client(docker_platform.url, docker_platform.key)
    assert upload_image_archive(found, client) is True
    assert upload_image_archive(found, client) is False  # stored: not sent again
    resp = docker_platform.http.post(
        "/v1/functions", params={"wait": "true"}, content=found.data,
        headers={"Content-Type": "application/gzip"})
    assert resp.status_code == 201, resp.text
    fn = resp.json()
    assert fn["state"] == "ready", fn
    assert fn["config"]["runtime"]["image"] == f"{tag}@{image_id}"

    # The agent loaded the image from the archive: the engine has it by its id.
    assert docker_client.images.get(image_id).id == image_id
    answer = docker_platform.invoke("archivefn")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"value": "from-archive",
                             "module": f"{IMAGE_MODULE_DIR}/imagevalue.py"}
    assert isinstance(docker_platform.platform, DockerPlatform)
    templates = agent_containers(docker_client, docker_platform.platform, mode="template")
    assert image_id in {c.image.id for c in templates}
    # The archive's temporary copy on the node is gone.
    loads = docker_platform.platform.home / "agent" / "local" / "image-loads"
    assert loads.is_dir() and not list(loads.iterdir())


def test_thaw_deploy_of_an_archive_uploads_it_and_the_node_loads_it(
        docker_platform: RunningPlatform, docker_client: Any, base_image: str,
        tmp_path: Path, image_tags: list[str]) -> None:
    tag = f"{REPOSITORY}-cli:v1"
    image_tags.append(tag)
    image_id = build_image(docker_client, base_image, tmp_path / "ctx", tag, "by-cli",
                           toml='name = "archivecli"\nhandler = "app:FromImage"\n')
    archive = save(docker_client, image_id, tmp_path / "image.tar", gz=False)
    docker_client.images.remove(image_id, force=True)

    env = cli_env(tmp_path, docker_platform.url, docker_platform.key)
    result = thaw(env, "deploy", str(archive))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].endswith("/fn/dev/archivecli")
    assert f"/srv/fn of {tag}@{image_id}" in result.stderr
    assert docker_client.images.get(image_id).id == image_id
    answer = docker_platform.invoke("archivecli")
    assert answer.status_code == 200, answer.text
    assert answer.json()["value"] == "by-cli"
    # Deployed again: the platform has the archive, the bundle is unchanged.
    again = thaw(env, "deploy", str(archive))
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout


def test_a_tampered_archive_is_refused(docker_platform: RunningPlatform, docker_client: Any,
                                       base_image: str, tmp_path: Path,
                                       image_tags: list[str]) -> None:
    tag = f"{REPOSITORY}-tampered:v1"
    image_tags.append(tag)
    image_id = build_image(docker_client, base_image, tmp_path / "ctx", tag, "x")
    archive = tamper(save(docker_client, image_id, tmp_path / "image.tar", gz=False),
                     tmp_path / "tampered.tar")
    hexid = image_id.removeprefix("sha256:")
    with pytest.raises(ThawError, match=f"the archive is tampered with or damaged: "
                                        f"{hexid}.json hashes to sha256:[0-9a-f]{{64}}, "
                                        f"not the {image_id} its manifest names"):
        bundle_from_image(str(archive))
    resp = docker_platform.http.put(f"/v1/images/{image_id}",
                                    content=archive.read_bytes(),
                                    headers={"Content-Type": "application/x-tar"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["field"] == "archive"
    assert "tampered with or damaged" in resp.json()["error"]["message"]
    # A renamed archive that is not one at all is refused as such.
    text = tmp_path / "notes.tar"
    shutil.copy(__file__, text)
    with pytest.raises(ThawError, match="notes.tar is not a docker save archive"):
        bundle_from_image(str(text))
