"""`thaw node ls` says when a node's pinned tier is not page-locked, and why; the agent's
heartbeat carries the lock state (an older agent's message reads as "locked unknown")."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from thaw.blobstore import PinnedUsage
from thaw.ops import nodes as nodes_module
from thaw.platform.telemetry import PINNED_LOCKED, PINNED_NOT_LOCKED, pinned_tier_info
from thaw.proto import scheduler_pb2

GIB = 1024**3


def node(node_id: str, pinned: dict[str, Any]) -> dict[str, Any]:
    return {"id": node_id, "state": "ready", "runtime": "process", "instances": 0,
            "devices": [], "disk_bytes": 0,
            "pinned": {"capacity_bytes": 2 * GIB, "used_bytes": GIB, "chunks": 3,
                       "snapshots": 1, **pinned}}


class FakeClient:
    nodes: list[dict[str, Any]] = []

    def request(self, method: str, path: str) -> FakeClient:
        assert (method, path) == ("GET", "/v1/nodes")
        return self

    def json(self) -> dict[str, Any]:
        return {"nodes": self.nodes}


def node_ls(monkeypatch: pytest.MonkeyPatch, nodes: list[dict[str, Any]]) -> str:
    FakeClient.nodes = nodes
    monkeypatch.setattr(nodes_module, "Client", FakeClient)
    result = CliRunner().invoke(nodes_module.node, ["ls"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_node_ls_says_which_pinned_tiers_are_not_locked_and_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    output = node_ls(monkeypatch, [
        node("gpu-a", {"lock": "locked", "lock_refusal": ""}),
        node("cpu-b", {"lock": "not locked",
                       "lock_refusal": "RLIMIT_MEMLOCK 8.0 MiB < 2.0 GiB"}),
        node("old-c", {}),
    ])
    lines = output.splitlines()
    assert "cpu-b: pinned tier not locked: RLIMIT_MEMLOCK 8.0 MiB < 2.0 GiB" in lines
    assert "old-c: pinned tier locked unknown" in lines
    assert not any(line.startswith("gpu-a:") for line in lines)
    rows = {line.split()[0]: line for line in lines if line.startswith(" ")}
    assert "(not locked)" in rows["cpu-b"]
    assert "(not locked)" not in rows["gpu-a"] and "(not locked)" not in rows["old-c"]


def test_the_note_text() -> None:
    assert nodes_module.pinned_lock_note({"lock": "locked"}) == ""
    assert nodes_module.pinned_lock_note({"lock": ""}) == "pinned tier locked unknown"
    assert nodes_module.pinned_lock_note({"lock": "not locked"}) == (
        "pinned tier not locked: no reason reported")
    assert nodes_module.PINNED_LOCKED == PINNED_LOCKED


def test_the_heartbeat_carries_the_lock_state() -> None:
    usage = PinnedUsage(capacity=2 * GIB, used=GIB, chunks=3, pinned=0, hits=1, misses=2,
                        evictions=0, dead=4096, locked=False,
                        lock_refusal="RLIMIT_MEMLOCK 8.0 MiB < 2.0 GiB")
    info = pinned_tier_info(usage, ["key-1"])
    assert (info.lock, info.lock_refusal) == (PINNED_NOT_LOCKED,
                                              "RLIMIT_MEMLOCK 8.0 MiB < 2.0 GiB")
    assert (info.capacity_bytes, info.used_bytes, info.dead_bytes) == (2 * GIB, GIB, 4096)
    assert list(info.snapshot_keys) == ["key-1"]
    # Through the wire and back; a message from an agent without the field says "".
    again = scheduler_pb2.PinnedTierInfo.FromString(info.SerializeToString())
    assert again.lock == PINNED_NOT_LOCKED
    old = scheduler_pb2.PinnedTierInfo(capacity_bytes=GIB)
    assert scheduler_pb2.PinnedTierInfo.FromString(old.SerializeToString()).lock == ""
    locked = pinned_tier_info(PinnedUsage(GIB, 0, 0, 0, 0, 0, 0, locked=True), [])
    assert locked.lock == PINNED_LOCKED and locked.lock_refusal == ""
