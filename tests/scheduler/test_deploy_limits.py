"""A deploy is admitted only within what the platform can give it
(scheduler/deploy_limits.py): min_instances within the tenant's quota, gpu_memory and
memory within the largest node. Each refusal is a 400 naming the thaw.toml key, and
nothing is stored; a bundle past its limits is refused before anything else."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from tests.scheduler.conftest import Cluster, GiB
from thaw.core.errors import BundleTooLarge, InvalidArgument, InvalidBundle, NotFound
from thaw.core.spec import pack_bundle
from thaw.scheduler.tenancy import create_tenant, set_quota


def bundle(tmp_path: Path, name: str, extra: str = "") -> bytes:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "thaw.toml").write_text(f'name = "{name}"\nhandler = "app:H"\n{extra}')
    (folder / "app.py").write_text("class H:\n    def __call__(self, r):\n        return r\n")
    return pack_bundle(str(folder))


async def refused(cluster: Cluster, tenant: str, data: bytes, field: str
                  ) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        await cluster.control.create_function(tenant, data, wait=False)
    assert caught.value.field == field, caught.value.message
    return caught.value


async def test_min_instances_must_fit_the_tenants_quota(cluster: Cluster,
                                                        tmp_path: Path) -> None:
    await cluster.add_node("n1", [8 * GiB])
    store = cluster.control.store
    await store.run(create_tenant, store, "acme")
    await store.run(set_quota, store, "acme", 2 * GiB, 3)
    err = await refused(cluster, "acme", bundle(tmp_path, "warm", (
        "[scaling]\nmin_instances = 4\nmax_instances = 8\n")), "scaling.min_instances")
    assert "quota of 3 instances" in err.message
    err = await refused(cluster, "acme", bundle(tmp_path, "big", (
        '[resources]\ngpu_memory = "1GiB"\n[scaling]\nmin_instances = 3\n')),
        "scaling.min_instances")
    assert "slice memory" in err.message
    with pytest.raises(NotFound):
        await cluster.control.get_function("acme", "warm")
    # Within the quota (and a tenant without one) it is admitted.
    fn = await cluster.control.create_function("acme", bundle(tmp_path, "fits", (
        '[resources]\ngpu_memory = "1GiB"\n[scaling]\nmin_instances = 2\n')), wait=False)
    assert fn.name == "fits"


async def test_resources_must_fit_the_largest_node(cluster: Cluster, tmp_path: Path) -> None:
    # No node yet: nothing to compare with, the build will wait for one.
    fn = await cluster.control.create_function("dev", bundle(tmp_path, "early", (
        '[resources]\ngpu_memory = "64GiB"\n')), wait=False)
    assert fn.name == "early"
    await cluster.add_node("n1", [4 * GiB, 8 * GiB])
    await cluster.add_node("n2", [2 * GiB])
    err = await refused(cluster, "dev", bundle(tmp_path, "huge", (
        '[resources]\ngpu_memory = "9GiB"\n')), "resources.gpu_memory")
    assert "8.0 GiB" in err.message
    cluster.control.nodes["n1"].telemetry.memory_total_bytes = 16 * GiB
    await refused(cluster, "dev", bundle(tmp_path, "fat", '[resources]\nmemory = "1TiB"\n'),
                  "resources.memory")
    fn = await cluster.control.create_function("dev", bundle(tmp_path, "ok", (
        '[resources]\ngpu_memory = "8GiB"\nmemory = "8GiB"\n')), wait=False)
    assert fn.name == "ok"


async def test_bad_thaw_toml_and_bad_bundles_are_refused_at_deploy(
        cluster: Cluster, tmp_path: Path) -> None:
    await cluster.add_node("n1")
    for extra, field in (("[scaling]\nmin_instances = 1000\nmax_instances = 1000\n",
                          "scaling.min_instances"),
                         ("[scaling]\ntimeout = nan\n", "scaling.timeout"),
                         ("[scaling]\nscaledown_window = inf\n", "scaling.scaledown_window"),
                         ('[resources]\ngpu_memory = "1000TiB"\n', "resources.gpu_memory")):
        await refused(cluster, "dev", bundle(tmp_path, f"f{len(field)}{len(extra)}", extra),
                      field)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("thaw.toml")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    err = await refused(cluster, "dev", buf.getvalue(), "thaw.toml")
    assert isinstance(err, InvalidBundle)
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 64 * 1024 * 1024
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(BundleTooLarge):
        await cluster.control.create_function("dev", gzip.compress(bomb.getvalue()),
                                              wait=False)
