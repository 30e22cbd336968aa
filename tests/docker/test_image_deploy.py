"""`thaw deploy IMAGE` against the real engine: a tenant image built here FROM the
base image (COPY and LABEL only: no network in the build), deployed with the real
CLI to a platform whose agent runs the docker runtime, answering from what is in the
image; a rebuild under the same tag is a new version answering the new value. And
the CLI's refusals: an unknown image, an image without the bundle folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningPlatform
from tests.docker.conftest import DockerPlatform, agent_containers, host_site_packages
from tests.ops.test_cli import cli_env, thaw
from thaw.core.errors import ThawError
from thaw.core.spec import parse_spec
from thaw.ops.image_deploy import BUNDLE_LABEL, bundle_from_image

pytestmark = pytest.mark.docker

REPOSITORY = "thaw-test/imagefn"
# A module installed in the image, outside the bundle: the handler answers its VALUE,
# which only a container of this image can import.
IMAGE_MODULE_DIR = "/usr/lib/python3/dist-packages"

APP = '''\
import imagevalue


class FromImage:
    def setup(self):
        self.value = imagevalue.VALUE

    def __call__(self, request):
        return {"value": self.value, "module": imagevalue.__file__}
'''


def build_image(client: Any, base: str, context: Path, tag: str, value: str, *,
                bundle_path: str = "/srv/fn", toml: str | None = 'name = "imagefn"\n'
                'handler = "app:FromImage"\n', with_bundle: bool = True) -> str:
    """A tenant image FROM the base image: the bundle at `bundle_path` (named by the
    label; thaw.toml unless `toml` is None), `imagevalue.py` among the image's
    packages. Returns the image id."""
    context.mkdir(parents=True, exist_ok=True)
    app = context / "app"
    app.mkdir(exist_ok=True)
    (app / "app.py").write_text(APP)
    if toml is not None:
        (app / "thaw.toml").write_text(toml)
    (context / "imagevalue.py").write_text(f"VALUE = {value!r}\n")
    lines = [f"FROM {base}", f"COPY imagevalue.py {IMAGE_MODULE_DIR}/imagevalue.py"]
    if with_bundle:
        lines.append(f"COPY app {bundle_path}")
    lines.append(f'LABEL {BUNDLE_LABEL}="{bundle_path}"')
    (context / "Dockerfile").write_text("\n".join(lines) + "\n")
    image, _logs = client.images.build(path=str(context), tag=tag, rm=True, pull=False,
                                       network_mode="none")
    return str(image.id)


@pytest.fixture
def tags(docker_client: Any) -> Iterator[list[str]]:
    """Tags a test builds; removed after it (images in use only lose the tag)."""
    made: list[str] = []
    yield made
    for tag in made:
        with contextlib.suppress(Exception):
            docker_client.images.remove(tag, force=True)


def test_deploy_image_runs_the_image_and_a_rebuild_is_a_new_version(
        docker_platform: RunningPlatform, docker_client: Any, base_image: str,
        tmp_path: Path, tags: list[str]) -> None:
    tag = f"{REPOSITORY}:latest"
    tags.append(tag)
    env = cli_env(tmp_path, docker_platform.url, docker_platform.key)

    first_id = build_image(docker_client, base_image, tmp_path / "v1", tag, "first")
    first = thaw(env, "deploy", tag)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1].endswith("/fn/dev/imagefn")
    assert f"/srv/fn of {tag}@{first_id}" in first.stderr

    fn = docker_platform.http.get("/v1/functions/imagefn").json()
    assert fn["state"] == "ready", fn
    assert fn["config"]["runtime"]["image"] == f"{tag}@{first_id}"
    first_version = fn["version"]
    answer = docker_platform.invoke("imagefn")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"value": "first",
                             "module": f"{IMAGE_MODULE_DIR}/imagevalue.py"}
    # The instance lives in a container of the tenant's image (by id), not the base.
    assert isinstance(docker_platform.platform, DockerPlatform)
    templates = agent_containers(docker_client, docker_platform.platform, mode="template")
    assert first_id in {c.image.id for c in templates}
    # The image's packages are the function's: the agent's site-packages stay out.
    ours = next(c for c in templates if c.image.id == first_id)
    mounted = {m["Destination"] for m in ours.attrs["Mounts"]}
    assert host_site_packages() not in mounted
    assert host_site_packages() not in str(ours.attrs["Config"]["Env"])

    second_id = build_image(docker_client, base_image, tmp_path / "v2", tag, "second")
    assert second_id != first_id
    second = thaw(env, "deploy", tag)
    assert second.returncode == 0, second.stderr
    fn = docker_platform.http.get("/v1/functions/imagefn").json()
    assert fn["version"] > first_version and fn["state"] == "ready", fn
    assert fn["config"]["runtime"]["image"] == f"{tag}@{second_id}"
    answer = docker_platform.invoke("imagefn")
    assert answer.status_code == 200, answer.text
    assert answer.json()["value"] == "second"


def test_image_function_with_fresh_starts(docker_platform: RunningPlatform,
                                          docker_client: Any, base_image: str,
                                          tmp_path: Path, tags: list[str]) -> None:
    tag = f"{REPOSITORY}-fresh:v1"
    tags.append(tag)
    build_image(docker_client, base_image, tmp_path, tag, "fresh-value",
                toml='name = "imagefn-fresh"\nhandler = "app:FromImage"\n'
                     '[snapshot]\nenabled = false\n')
    resp = docker_platform.http.post(
        "/v1/functions", params={"wait": "true"},
        content=bundle_from_image(tag, docker_client).data,
        headers={"Content-Type": "application/gzip"})
    assert resp.status_code == 201, resp.text
    answer = docker_platform.invoke("imagefn-fresh")
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Thaw-Start"] == "fresh"
    assert answer.json()["value"] == "fresh-value"


def test_image_missing_on_the_node_fails_the_build(docker_platform: RunningPlatform,
                                                   tmp_path: Path) -> None:
    absent = "thaw-test/absent:v1@sha256:" + "0" * 64
    folder = tmp_path / "absent"
    folder.mkdir()
    (folder / "app.py").write_text(APP)
    (folder / "thaw.toml").write_text(
        f'name = "imagefn-absent"\nhandler = "app:FromImage"\n[runtime]\nimage = "{absent}"\n')
    # The agent registered as a docker node: the build goes to it, and its engine's
    # refusal (no other docker node to try) is the reason.
    nodes = docker_platform.http.get("/v1/nodes").json()["nodes"]
    assert [n["runtime"] for n in nodes] == ["docker"]
    resp = docker_platform.deploy(folder)
    assert resp.status_code == 201, resp.text
    fn = docker_platform.http.get("/v1/functions/imagefn-absent").json()
    assert fn["state"] == "failed", fn
    assert fn["reason"] == (f"snapshot build failed: image {absent} is not on node local's "
                            "docker engine (nothing is pulled: `docker load` it there)")


def test_deploy_by_image_id_pins_its_tag(docker_client: Any, base_image: str,
                                         tmp_path: Path, tags: list[str]) -> None:
    tag = f"{REPOSITORY}-byid:v1"
    tags.append(tag)
    image_id = build_image(docker_client, base_image, tmp_path, tag, "by-id",
                           bundle_path="/app")
    found = bundle_from_image(image_id.removeprefix("sha256:")[:12], docker_client)
    assert found.image == f"{tag}@{image_id}" and found.bundle_path == "/app"
    assert parse_spec_of(found.data).runtime.image_id == image_id


def parse_spec_of(data: bytes) -> Any:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        handle = tar.extractfile("thaw.toml")
        assert handle is not None
        return parse_spec(handle.read().decode())


def test_unknown_image_is_one_line(tmp_path: Path, docker_client: Any) -> None:
    env = cli_env(tmp_path, "http://127.0.0.1:9", "unused")
    result = thaw(env, "deploy", "thaw-test/no-such-image:nope")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: thaw-test/no-such-image:nope is neither a folder nor an image the local "
        "docker engine has (nothing is pulled: build or load the image first)")


def test_image_without_the_bundle_folder(docker_client: Any, base_image: str,
                                         tmp_path: Path, tags: list[str]) -> None:
    tag = f"{REPOSITORY}-nobundle:v1"
    tags.append(tag)
    build_image(docker_client, base_image, tmp_path, tag, "x", with_bundle=False)
    with pytest.raises(ThawError, match=f"image {tag} has no /srv/fn: put the bundle "
                                        f"folder .* label {BUNDLE_LABEL}"):
        bundle_from_image(tag, docker_client)
    # And the copy container is gone.
    left = docker_client.containers.list(all=True, filters={"label": "org.thaw.deploy-copy"})
    assert not left


def test_image_whose_bundle_has_no_thaw_toml(docker_client: Any, base_image: str,
                                             tmp_path: Path, tags: list[str]) -> None:
    tag = f"{REPOSITORY}-notoml:v1"
    tags.append(tag)
    build_image(docker_client, base_image, tmp_path, tag, "x", toml=None)
    with pytest.raises(ThawError, match=f"image {tag} has no thaw.toml in /srv/fn"):
        bundle_from_image(tag, docker_client)


def test_image_whose_thaw_toml_names_another_runtime(docker_client: Any, base_image: str,
                                                     tmp_path: Path,
                                                     tags: list[str]) -> None:
    tag = f"{REPOSITORY}-runtime:v1"
    tags.append(tag)
    other = "other/image:v1@sha256:" + "0" * 64
    build_image(docker_client, base_image, tmp_path, tag, "x",
                toml=f'name = "x"\nhandler = "app:FromImage"\n[runtime]\nimage = "{other}"\n')
    with pytest.raises(ThawError, match="remove \\[runtime\\]"):
        bundle_from_image(tag, docker_client)


def test_folder_naming_an_image_by_tag_is_pinned(docker_client: Any, base_image: str,
                                                 tmp_path: Path, tags: list[str]) -> None:
    from thaw.ops.image_deploy import bundle_from_folder

    tag = f"{REPOSITORY}-folder:v1"
    tags.append(tag)
    image_id = build_image(docker_client, base_image, tmp_path / "image", tag, "x")
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "app.py").write_text(APP)
    toml = f'name = "folder"\nhandler = "app:FromImage"\n\n[runtime]\nimage = "{tag}"\n'
    (folder / "thaw.toml").write_text(toml)
    data = bundle_from_folder(folder, docker_client)
    assert parse_spec_of(data).runtime.image == f"{tag}@{image_id}"
    assert (folder / "thaw.toml").read_text() == toml  # the folder is not touched
