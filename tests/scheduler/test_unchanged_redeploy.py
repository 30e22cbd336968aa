"""A redeploy of the bundle a function serves (same digest) keeps its version and
builds nothing (scheduler/builds.py deploy, versions.py keep_unchanged); any change,
thaw.toml included, is a new version; `force` builds one anyway; a function that is
not serving (failed) is built again. Over a real DB with gated fake agents."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.scheduler.conftest import Cluster
from tests.scheduler.test_versions import NAME, add_gated_node, deploy, serve_one
from thaw.core.spec import pack_bundle
from thaw.scheduler.states import FunctionState
from thaw.scheduler.versions import VersionState


def folder(tmp_path: Path, tag: str, toml_extra: str = "") -> Path:
    where = tmp_path / f"fn-{tag}"
    where.mkdir(exist_ok=True)
    (where / "thaw.toml").write_text(f'name = "{NAME}"\nhandler = "app:Versioned"\n'
                                     + toml_extra)
    (where / "app.py").write_text(
        f"class Versioned:\n    def __call__(self, request):\n        return {{'v': '{tag}'}}\n")
    return where


async def versions(cluster: Cluster) -> list[tuple[int, VersionState]]:
    _fn, found = await cluster.control.list_versions("dev", NAME)
    return [(v.version, v.state) for v in found]


async def test_the_same_bundle_again_keeps_its_version_and_builds_nothing(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    where = folder(tmp_path, "one")
    await deploy(cluster, agent, pack_bundle(str(where)))
    instance, version = await serve_one(cluster)
    assert version == 1 and len(agent.builds) == 1

    (where / "app.py").touch()  # packs to the same bytes all the same
    again = await cluster.control.deploy("dev", pack_bundle(str(where)), wait=True)
    assert again.unchanged and again.function.version == 1
    assert again.function.state is FunctionState.READY
    assert len(agent.builds) == 1  # no build was asked of any node
    assert await versions(cluster) == [(1, VersionState.READY)]
    # The serving instance was not retired: the same one answers.
    assert await serve_one(cluster) == (instance, 1)


async def test_a_change_to_thaw_toml_alone_is_a_new_version(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    await deploy(cluster, agent, pack_bundle(str(folder(tmp_path, "one"))))
    changed = pack_bundle(str(folder(tmp_path, "one", '[env]\nLOG_LEVEL = "debug"\n')))
    task = asyncio.create_task(cluster.control.deploy("dev", changed, wait=True))
    await agent.finish(ok=True)
    deployed = await task
    assert not deployed.unchanged and deployed.function.version == 2
    assert len(agent.builds) == 2


async def test_force_builds_the_same_bundle_as_a_new_version(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    data = pack_bundle(str(folder(tmp_path, "one")))
    await deploy(cluster, agent, data)
    task = asyncio.create_task(cluster.control.deploy("dev", data, wait=True, force=True))
    await agent.finish(ok=True)
    forced = await task
    assert not forced.unchanged and forced.function.version == 2
    assert await versions(cluster) == [(2, VersionState.READY), (1, VersionState.READY)]


async def test_a_failed_function_is_built_again_from_the_same_bundle(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    data = pack_bundle(str(folder(tmp_path, "one")))
    await deploy(cluster, agent, data, ok=False)
    assert (await cluster.control.get_function("dev", NAME)).state is FunctionState.FAILED
    task = asyncio.create_task(cluster.control.deploy("dev", data, wait=True))
    await agent.finish(ok=True)
    again = await task
    assert not again.unchanged and again.function.version == 2
    assert again.function.state is FunctionState.READY


async def test_redeploying_what_serves_supersedes_a_build_in_progress(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    serving = pack_bundle(str(folder(tmp_path, "one")))
    await deploy(cluster, agent, serving)
    building = asyncio.create_task(cluster.control.create_function(
        "dev", pack_bundle(str(folder(tmp_path, "two"))), wait=True))
    await agent.building()
    kept = await cluster.control.deploy("dev", serving, wait=True)
    assert kept.unchanged and kept.function.version == 1
    # The tenant asked for what serves: v2's build no longer switches when it ends.
    await agent.finish(ok=True)
    after = await building
    assert after.version == 1
    assert await versions(cluster) == [(2, VersionState.FAILED), (1, VersionState.READY)]
    _fn, found = await cluster.control.list_versions("dev", NAME)
    assert "unchanged" in found[0].reason
