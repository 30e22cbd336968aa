"""A node's storage health (platform/storage.py): a data directory full by statvfs,
mounted read-only, or failing a test write is a condition, refused with 507 naming the
node and the directory; and the node_storage alert rule fires on such conditions."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from thaw.core.config import GatewayConfig
from thaw.core.errors import InsufficientStorage
from thaw.gateway.alerts.rules import node_storage, rules_from_settings
from thaw.gateway.alerts.view import ClusterView
from thaw.platform.storage import DISK_FULL, READ_ONLY, StorageHealth
from thaw.proto import scheduler_pb2

MiB = 1024**2


def fake_statvfs(free: int, total: int = 1024 * MiB, flags: int = 0):  # type: ignore[no-untyped-def]
    block = 4096

    def statvfs(path: str) -> os.statvfs_result:
        return os.statvfs_result((block, block, total // block, free // block,
                                  free // block, 1000, 900, 900, flags, 255))
    return statvfs


def writes_ok(folder: Path) -> None:
    pass


def health(tmp_path: Path, statvfs: object, probe: object = writes_ok) -> StorageHealth:
    return StorageHealth("n1", [tmp_path / "home", tmp_path / "shm"], 64 * MiB,
                         statvfs=statvfs, probe=probe)  # type: ignore[arg-type]


def test_a_healthy_node_has_no_condition_and_refuses_nothing(tmp_path: Path) -> None:
    h = health(tmp_path, fake_statvfs(free=512 * MiB))
    assert h.check() == []
    h.refuse_writes("building dev/f")


def test_little_free_space_is_disk_full_and_refused_with_507(tmp_path: Path) -> None:
    h = health(tmp_path, fake_statvfs(free=10 * MiB))
    found = h.check()
    assert [(c.type, c.path) for c in found] == [
        (DISK_FULL, str(tmp_path / "home")), (DISK_FULL, str(tmp_path / "shm"))]
    assert found[0].free_bytes == 10 * MiB and found[0].total_bytes == 1024 * MiB
    assert "below storage_min_free" in found[0].message
    with pytest.raises(InsufficientStorage) as refused:
        h.refuse_writes("building dev/f")
    assert refused.value.message.startswith(
        f"insufficient storage on node n1: {tmp_path / 'home'} is disk-full")
    assert "building dev/f refused" in refused.value.message


def test_a_read_only_mount_is_a_condition(tmp_path: Path) -> None:
    h = health(tmp_path, fake_statvfs(free=512 * MiB, flags=os.ST_RDONLY))
    assert {c.type for c in h.check()} == {READ_ONLY}
    assert h.conditions[0].message == "mounted read-only"


@pytest.mark.parametrize(("code", "kind"), [(errno.ENOSPC, DISK_FULL),
                                            (errno.EROFS, READ_ONLY),
                                            (errno.EACCES, READ_ONLY)])
def test_a_failing_test_write_is_a_condition(tmp_path: Path, code: int, kind: str) -> None:
    def probe(folder: Path) -> None:
        raise OSError(code, os.strerror(code))

    h = health(tmp_path, fake_statvfs(free=512 * MiB), probe)
    assert [c.type for c in h.check()] == [kind, kind]
    assert os.strerror(code) in h.conditions[0].message


def test_the_real_probe_writes_and_cleans_up(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "shm").mkdir()
    h = StorageHealth("n1", [tmp_path / "home", tmp_path / "shm"], 0)
    assert h.check() == []
    assert list((tmp_path / "home").iterdir()) == []
    missing = StorageHealth("n1", [tmp_path / "gone"], 0)
    assert [c.type for c in missing.check()] == [READ_ONLY]  # cannot even stat it


def node(node_id: str, state: str = "ready", *conditions: tuple[str, str]
         ) -> scheduler_pb2.NodeInfo:
    return scheduler_pb2.NodeInfo(id=node_id, state=state, conditions=[
        scheduler_pb2.NodeCondition(type=t, path=p, message="3 MiB free of 1 GiB")
        for t, p in conditions])


def test_the_node_storage_alert_fires_for_each_condition_of_a_live_node() -> None:
    (rule,) = [r for r in rules_from_settings(GatewayConfig.load(flags={}))
               if r.name == "node_storage"]
    assert rule.severity == "critical"
    view = ClusterView(now=0.0, nodes=[
        node("a"), node("b", "ready", ("disk_full", "/data/b")),
        node("c", "lost", ("read_only", "/data/c"))])
    breaches = node_storage(rule, view)
    assert breaches is not None and [(b.subject, b.value) for b in breaches] == [
        ("b:/data/b", "disk_full")]
    assert "node b: /data/b is disk-full (3 MiB free of 1 GiB)" in breaches[0].message
    assert node_storage(rule, ClusterView(now=0.0)) is None
