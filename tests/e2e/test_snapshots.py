"""Snapshots across nodes and tiers: peer fetch, prewarm/evict, templates that skip
imports, and quarantine of a snapshot whose restore fails (issue 3)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FIXTURES, RunningPlatform
from thaw.ops.services import LocalPlatform

HEARTBEAT_WAIT = 15.0


def expected_checksum() -> str:
    rng = np.random.default_rng(1234)
    return hashlib.sha256(rng.standard_normal(4 * 1024 * 1024, dtype=np.float32)
                          .tobytes()).hexdigest()


def nodes(p: RunningPlatform) -> dict[str, dict]:
    return {n["id"]: n for n in p.http.get("/v1/nodes").json()["nodes"]}


def wait_for(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + HEARTBEAT_WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[RunningPlatform]:
    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x2GiB", agents=2)
    try:
        local.start()
        wait_for(lambda: len(nodes(RunningPlatform(local))) == 2, "two nodes")
        yield RunningPlatform(local)
    finally:
        local.stop()


def test_restore_on_a_node_that_fetches_chunks_from_its_peer(two_nodes: RunningPlatform) -> None:
    p = two_nodes
    fn = p.deploy(FIXTURES / "weights").json()
    assert fn["state"] == "ready" and fn["start_mode"] == "restore", fn
    wait_for(lambda: sum(1 for n in nodes(p).values() if n["disk_bytes"] > 0) == 1,
             "the builder's heartbeat")
    holder = next(n for n, info in nodes(p).items() if info["disk_bytes"] > 0)
    other = next(n for n in nodes(p) if n != holder)

    assert p.http.post(f"/v1/nodes/{holder}/cordon").json()["state"] == "cordoned"
    resp = p.invoke("weights")
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Thaw-Start"] == "restore"
    assert resp.headers["X-Thaw-Node"] == other
    body = resp.json()
    assert body["checksum"] == expected_checksum()
    assert body["setup_pid"] != body["pid"]
    # The chunks now sit on the other node's disk too: it fetched them over gRPC.
    wait_for(lambda: nodes(p)[other]["disk_bytes"] >= 16 * 1024 * 1024, "fetched chunks")
    assert p.http.post(f"/v1/nodes/{holder}/uncordon").json()["state"] == "ready"


def test_prewarm_and_evict_move_the_snapshot_through_host_memory(
        two_nodes: RunningPlatform) -> None:
    p = two_nodes
    assert p.deploy(FIXTURES / "weights").json()["state"] == "ready"
    # The deploy made the snapshot's memfds for its template: it is in host memory
    # already, and a prewarm copies nothing into the pinned tier.
    reply = p.http.post("/v1/functions/weights/prewarm").json()
    assert len(reply["nodes"]) == 1 and reply["bytes"] < 16 * 1024 * 1024
    node = reply["nodes"][0]
    wait_for(lambda: nodes(p)[node]["pinned"]["snapshots"] == 1, "held")
    # Evicted, its memfds (16 MiB of weights among them) are closed...
    assert p.http.post("/v1/functions/weights/evict").json()["bytes"] >= 16 * 1024 * 1024
    wait_for(lambda: nodes(p)[node]["pinned"]["snapshots"] == 0, "evicted")
    # ...so a prewarm now reads every chunk into the pinned tier.
    reply = p.http.post("/v1/functions/weights/prewarm").json()
    assert reply["bytes"] >= 16 * 1024 * 1024
    # Both from one heartbeat; one taken while the prewarm was storing its chunks has
    # the bytes but not yet the snapshot.
    wait_for(lambda: nodes(p)[node]["pinned"]["used_bytes"] >= 16 * 1024 * 1024
             and nodes(p)[node]["pinned"]["snapshots"] == 1, "pinned")
    # No GPU (slice) memory is used by a prewarm.
    assert all(d["used_bytes"] == 0 for d in nodes(p)[node]["devices"])
    evicted = p.http.post("/v1/functions/weights/evict").json()
    assert evicted["bytes"] >= 16 * 1024 * 1024
    wait_for(lambda: nodes(p)[node]["pinned"]["used_bytes"] == 0, "evicted")
    assert nodes(p)[node]["pressure"] == "normal"
    # Still restorable from disk.
    resp = p.invoke("weights")
    assert resp.headers["X-Thaw-Start"] == "restore"
    assert resp.json()["checksum"] == expected_checksum()


def test_restored_instance_was_forked_from_a_template_that_imported_the_modules(
        platform: RunningPlatform) -> None:
    assert platform.deploy(FIXTURES / "weights").json()["state"] == "ready"
    body = platform.invoke("weights").json()
    # The module was imported by the template before the fork, not by the instance,
    # and setup() ran in the build process: a restore skips both.
    assert body["imported_in_pid"] != body["pid"]
    assert body["setup_pid"] not in (body["pid"], body["imported_in_pid"])


def test_a_snapshot_whose_restore_fails_is_quarantined_runs_fresh_and_is_rebuilt(
        tmp_path: Path) -> None:
    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x2GiB")
    local.start()
    try:
        p = RunningPlatform(local)
        assert p.deploy(FIXTURES / "weights").json()["start_mode"] == "restore"
        # Drop the host-memory copies, then flip a byte in every chunk on disk.
        p.http.post("/v1/functions/weights/evict").raise_for_status()
        chunks = [f for f in (tmp_path / "home" / "agent").rglob("chunks/blake3/*/*")
                  if f.is_file()]
        assert chunks
        for path in chunks:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(data)

        resp = p.invoke("weights")
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Thaw-Start"] == "fresh"
        assert resp.json()["checksum"] == expected_checksum()
        quarantined = p.http.get("/v1/events", params={"kind": "snapshot_quarantined"})
        assert len(quarantined.json()["events"]) == 1
        # No node holds a good copy: the snapshot is rebuilt from the bundle, once,
        # as the same version (docs/faults.md), and restores are offered again.
        deadline = time.monotonic() + 120
        while (fn := p.http.get("/v1/functions/weights").json())["start_mode"] != "restore":
            assert time.monotonic() < deadline, fn
            time.sleep(0.2)
        assert fn["version"] == "1" and fn["state"] == "ready"
        rebuilt = p.http.get("/v1/events", params={"kind": "chunk_repaired"}).json()
        assert [e["attrs"]["how"] for e in rebuilt["events"]] == ["rebuild"]
        assert p.http.post("/v1/functions/weights/evict").status_code == 200
    finally:
        local.stop()


def test_deleting_a_function_collects_its_chunks(two_nodes: RunningPlatform) -> None:
    p = two_nodes
    assert p.deploy(FIXTURES / "weights").json()["state"] == "ready"
    wait_for(lambda: sum(n["disk_bytes"] for n in nodes(p).values()) >= 16 * 1024 * 1024,
             "chunks on disk")
    assert p.http.delete("/v1/functions/weights").status_code == 204
    wait_for(lambda: sum(n["disk_bytes"] for n in nodes(p).values()) == 0,
             "garbage collection")
    assert p.invoke("weights").status_code == 404


def test_state_that_cannot_be_snapshotted_runs_fresh_and_says_where(
        platform: RunningPlatform) -> None:
    fn = platform.deploy(FIXTURES / "holds_socket").json()
    assert fn["state"] == "ready" and fn["start_mode"] == "fresh", fn
    assert "self.client._sock" in fn["reason"] and "fresh starts" in fn["reason"]
    resp = platform.invoke("holds-socket")
    assert resp.status_code == 200 and resp.headers["X-Thaw-Start"] == "fresh"
    body = resp.json()
    assert body["setup_pid"] == body["pid"]  # setup() ran in this very instance


def test_a_copy_of_running_code_builds_in_its_template_without_imports(
        platform: RunningPlatform, tmp_path: Path) -> None:
    import shutil

    first = platform.deploy(FIXTURES / "weights").json()
    assert first["state"] == "ready"
    original = platform.invoke("weights").json()
    copy = tmp_path / "weights-copy"
    shutil.copytree(FIXTURES / "weights", copy)
    toml = (copy / "thaw.toml").read_text().replace('name = "weights"', 'name = "weights-copy"')
    (copy / "thaw.toml").write_text(toml)
    assert platform.deploy(copy).json()["state"] == "ready"
    body = platform.invoke("weights-copy").json()
    assert body["checksum"] == original["checksum"]
    # setup() of the copy ran in a child forked from the template that had already
    # imported the module, not in a process that imported it itself.
    assert body["imported_at_setup"] != body["setup_pid"]


def test_a_restored_snapshot_is_kept_in_the_nodes_pinned_tier(two_nodes: RunningPlatform) -> None:
    p = two_nodes
    assert p.deploy(FIXTURES / "weights").json()["state"] == "ready"
    node = p.invoke("weights").headers["X-Thaw-Node"]
    # The prewarm policy keeps it in host memory; its 16 MiB host arena is the memfd
    # the restore made, not copied into the pinned tier a second time.
    wait_for(lambda: nodes(p)[node]["pinned"]["snapshots"] == 1, "the prewarm policy")
    assert nodes(p)[node]["pinned"]["used_bytes"] < 16 * 1024 * 1024
