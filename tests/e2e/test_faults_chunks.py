"""A corrupt chunk heals by itself: a real LocalPlatform whose node's chunk files are
damaged on disk (the agent restarted, so nothing good is left in its memory). With a
second node holding the snapshot, the restore fetches the chunk again from it and goes
on; with none, the snapshot is quarantined, the call starts fresh, and the snapshot is
rebuilt from the bundle, after which starts are restores again. Each says so in the
event feed (chunk_repaired)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import FIXTURES, RunningPlatform
from thaw.ops.services import LocalPlatform

WAIT_SECONDS = 120.0


def corrupt_chunks(home: Path, node_id: str) -> int:
    """Flip every byte of every chunk file of the node (same sizes); returns how many."""
    files = [f for f in (home / "agent" / node_id / "chunks").rglob("*")
             if f.is_file() and not f.name.startswith(".")]
    for chunk in files:
        chunk.write_bytes(bytes(b ^ 0xFF for b in chunk.read_bytes()))
    return len(files)


def repaired(p: RunningPlatform) -> list[dict[str, object]]:
    events = p.http.get("/v1/events", params={"kind": "chunk_repaired"}).json()
    return list(events["events"])


def test_a_corrupt_chunk_is_fetched_again_from_the_node_holding_it(tmp_path: Path) -> None:
    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x2GiB", agents=2)
    local.start()
    try:
        p = RunningPlatform(local)
        assert p.deploy(FIXTURES / "sleep").json()["state"] == "ready"  # built on node0
        p.http.post("/v1/nodes/node0/cordon").raise_for_status()
        first = p.invoke("sleep", {"seconds": 0})
        assert first.headers["X-Thaw-Node"] == "node1"  # restored from node0's chunks
        p.http.post("/v1/nodes/node0/uncordon").raise_for_status()
        p.http.post("/v1/nodes/node1/cordon").raise_for_status()

        assert corrupt_chunks(local.home, "node0") > 0
        local.restart_agent("node0")  # nothing of the snapshot left in its memory
        local.restart_agent("node1")  # its warm instance gone; it stays cordoned
        reply = p.invoke("sleep", {"seconds": 0})
        assert reply.status_code == 200, reply.text
        assert reply.headers["X-Thaw-Node"] == "node0"
        assert reply.headers["X-Thaw-Start"] == "restore"
        deadline = time.monotonic() + WAIT_SECONDS
        while not (events := repaired(p)):  # the node's next heartbeat reports it
            assert time.monotonic() < deadline, "no chunk_repaired event"
            time.sleep(0.2)
        assert [e["node_id"] for e in events] == ["node0"], events
        assert "was corrupt on node node0; fetched again from a peer" in str(
            events[0]["message"])
        fn = p.http.get("/v1/functions/sleep").json()
        assert fn["start_mode"] == "restore", fn
    finally:
        local.stop()


def test_a_corrupt_chunk_no_node_can_repair_rebuilds_the_snapshot(tmp_path: Path) -> None:
    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x2GiB")
    local.start()
    try:
        p = RunningPlatform(local)
        assert p.deploy(FIXTURES / "sleep").json()["state"] == "ready"
        assert p.invoke("sleep", {"seconds": 0}).headers["X-Thaw-Start"] == "restore"
        assert corrupt_chunks(local.home, "local") > 0
        local.restart_agent("local")

        reply = p.invoke("sleep", {"seconds": 0})
        assert reply.status_code == 200, reply.text  # served fresh meanwhile
        deadline = time.monotonic() + WAIT_SECONDS
        while (fn := p.http.get("/v1/functions/sleep").json())["start_mode"] != "restore":
            assert time.monotonic() < deadline, f"snapshot never rebuilt: {fn}"
            time.sleep(0.2)
        assert fn["state"] == "ready"
        events = repaired(p)
        assert len(events) == 1 and "rebuilding its snapshot" in str(events[0]["message"])
        assert "is corrupt" in str(events[0]["message"])
        quarantined = p.http.get("/v1/events", params={"kind": "snapshot_quarantined"})
        assert len(quarantined.json()["events"]) == 1

        local.restart_agent("local")  # its fresh instance goes: the next start restores
        again = p.invoke("sleep", {"seconds": 0})
        assert again.status_code == 200 and again.headers["X-Thaw-Start"] == "restore"
    finally:
        local.stop()
