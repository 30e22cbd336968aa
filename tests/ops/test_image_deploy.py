"""`thaw deploy PATH|IMAGE` without an engine: which argument is a folder and which
an image, the CLI's one-line refusals, `[runtime] image` in thaw.toml (pinning,
validation: 400 naming `runtime.image`), and a process-runtime node refusing an
image function with a reason the function's state shows. The image path itself is
tested against the real engine in tests/docker/test_image_deploy.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FIXTURES, RunningPlatform
from tests.ops.test_cli import cli_env, thaw
from thaw.core.errors import InvalidBundle, ThawError
from thaw.core.spec import pack_bundle, parse_spec, pin_runtime_image
from thaw.ops.image_deploy import (
    bundle_from_image,
    deploy_target,
    pinned_reference,
    unpinned_image,
)

IMAGE_ID = "sha256:" + "ab" * 32
PINNED = f"tenant/app:v1@{IMAGE_ID}"
TOML = 'name = "img"\nhandler = "app:Echo"\n'


def test_a_folder_is_a_bundle_anything_else_an_image(tmp_path: Path) -> None:
    assert deploy_target(str(tmp_path)) == tmp_path
    assert deploy_target("tenant/app:v1") == "tenant/app:v1"
    assert deploy_target(str(tmp_path / "missing")) == str(tmp_path / "missing")
    # A file is an image archive (`docker save`): one that is not is refused as such.
    (tmp_path / "file.txt").write_text("x")
    assert deploy_target(str(tmp_path / "file.txt")) == str(tmp_path / "file.txt")
    with pytest.raises(ThawError, match="file.txt is not a docker save archive"):
        bundle_from_image(str(tmp_path / "file.txt"))


def test_cli_folder_without_thaw_toml_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "app.py").write_text("")
    result = thaw(cli_env(tmp_path, "http://127.0.0.1:9", "unused"), "deploy", str(folder))
    assert result.returncode == 1
    assert result.stderr == f"error: {folder} has no thaw.toml (a bundle folder needs one)\n"


def test_cli_image_without_an_engine_says_both(tmp_path: Path) -> None:
    env = cli_env(tmp_path, "http://127.0.0.1:9", "unused",
                  DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    result = thaw(env, "deploy", "tenant/app:v1")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: tenant/app:v1 is not a folder, and it cannot "
                                    "be looked up as an image: no docker engine reachable")


def test_pin_appends_a_runtime_table() -> None:
    pinned = pin_runtime_image(TOML, PINNED)
    assert pinned.startswith(TOML)
    spec = parse_spec(pinned)
    assert spec.runtime.image == PINNED and spec.runtime.image_id == IMAGE_ID
    assert parse_spec(pin_runtime_image(TOML.rstrip("\n"), PINNED)).runtime.image == PINNED
    # Already pinned to this very image: kept as is.
    assert pin_runtime_image(pinned, PINNED) == pinned


def test_pin_refuses_a_thaw_toml_naming_another_runtime() -> None:
    other = pin_runtime_image(TOML, f"other:v2@sha256:{'cd' * 32}")
    with pytest.raises(InvalidBundle, match="remove \\[runtime\\]") as caught:
        pin_runtime_image(other, PINNED)
    assert caught.value.field == "runtime.image"


@pytest.mark.parametrize("image", [
    "tenant/app:v1",                          # not pinned
    "tenant/app:v1@sha256:abc",               # not a full id
    f"Tenant/App:v1@{IMAGE_ID}",              # upper case repository
    f"tenant/app:v1@{IMAGE_ID.upper()}",
    f"tenant/app:-bad@{IMAGE_ID}",            # a tag starts with a word character
    f"tenant app@{IMAGE_ID}",
    3,
])
def test_malformed_image_names_runtime_image(image: object) -> None:
    value = f'"{image}"' if isinstance(image, str) else str(image)
    with pytest.raises(InvalidBundle) as caught:
        parse_spec(f"{TOML}[runtime]\nimage = {value}\n")
    assert caught.value.field == "runtime.image"


@pytest.mark.parametrize("image", [
    PINNED, f"@{IMAGE_ID}", f"localhost:5000/team/app@{IMAGE_ID}",
    f"registry.example.com/a-b/c_d:1.2.3-rc1@{IMAGE_ID}"])
def test_pinned_images_are_accepted(image: str) -> None:
    assert parse_spec(f'{TOML}[runtime]\nimage = "{image}"\n').runtime.image == image


def test_unknown_runtime_key_is_named() -> None:
    with pytest.raises(InvalidBundle) as caught:
        parse_spec(f'{TOML}[runtime]\nimage = "{PINNED}"\npull = true\n')
    assert caught.value.field == "runtime.pull"


class FakeImage:
    def __init__(self, tags: list[str]) -> None:
        self.id = IMAGE_ID
        self.tags = tags


def test_pinned_reference_keeps_the_name_typed() -> None:
    assert pinned_reference("tenant/app:v1", FakeImage([])) == PINNED
    # A registry digest is not the local id: dropped for it.
    assert pinned_reference(f"tenant/app@sha256:{'ef' * 32}",
                            FakeImage([])) == f"tenant/app@{IMAGE_ID}"
    # Named by id: the image's first tag, or none.
    assert pinned_reference("abab", FakeImage(["tenant/app:v1"])) == PINNED
    assert pinned_reference(IMAGE_ID, FakeImage([])) == f"@{IMAGE_ID}"


def test_unpinned_image_of_a_folder(tmp_path: Path) -> None:
    (tmp_path / "thaw.toml").write_text(TOML)
    assert unpinned_image(tmp_path) == ""
    (tmp_path / "thaw.toml").write_text(f'{TOML}[runtime]\nimage = "tenant/app:v1"\n')
    assert unpinned_image(tmp_path) == "tenant/app:v1"
    (tmp_path / "thaw.toml").write_text(f'{TOML}[runtime]\nimage = "{PINNED}"\n')
    assert unpinned_image(tmp_path) == ""


def bundle_with_image(tmp_path: Path, name: str, image: str) -> bytes:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "app.py").write_text((FIXTURES / "prints" / "app.py").read_text())
    handler = next(line for line in (FIXTURES / "prints" / "thaw.toml").read_text()
                   .splitlines() if line.startswith("handler"))
    (folder / "thaw.toml").write_text(
        f'name = "{name}"\n{handler}\n\n[runtime]\nimage = "{image}"\n')
    return pack_bundle(str(folder))


def test_gateway_refuses_a_malformed_image(platform: RunningPlatform, tmp_path: Path) -> None:
    resp = platform.http.post("/v1/functions", content=bundle_with_image(
        tmp_path, "img-bad", "tenant/app:latest"), headers={"Content-Type": "application/gzip"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["field"] == "runtime.image"
    assert platform.http.get("/v1/functions/img-bad").status_code == 404


def test_with_only_process_nodes_an_image_function_fails_at_once(platform: RunningPlatform,
                                                                 tmp_path: Path) -> None:
    # The agent registered its runtime; the scheduler sends no image function to it.
    nodes = platform.http.get("/v1/nodes").json()["nodes"]
    assert nodes and {n["runtime"] for n in nodes} == {"process"}
    table = thaw(cli_env(tmp_path, platform.url, platform.key), "node", "ls")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:3] == ["node", "state", "runtime"]
    assert row.split()[2] == "process"
    data = bundle_with_image(tmp_path, "img-on-process", PINNED)
    resp = platform.http.post("/v1/functions", params={"wait": "true"}, content=data,
                              headers={"Content-Type": "application/gzip"})
    assert resp.status_code == 201, resp.text
    fn = platform.http.get("/v1/functions/img-on-process").json()
    assert fn["state"] == "failed", fn
    no_docker = ("no node runs the docker runtime; image functions need "
                 "THAW_RUNTIME=docker on at least one node")
    assert fn["reason"] == f"snapshot build failed: {no_docker}"
    assert fn["config"]["runtime"]["image"] == PINNED
    answer = platform.invoke("img-on-process")
    assert answer.status_code == 503, answer.text
    assert no_docker in answer.json()["error"]["message"]
