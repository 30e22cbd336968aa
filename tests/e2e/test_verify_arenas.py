"""On a running platform, `POST /v1/functions/{name}/verify` (what `thaw snapshot
verify` calls) checks what a restore mapped: after a cold start the node's sealed
memfds of the snapshot are read and hashed too, not only its chunks on disk. And a
restored instance, running the tenant's code under its own uid, cannot change them."""

from __future__ import annotations

import os

from tests.conftest import FIXTURES, RunningPlatform

# A verify pass over a 16 MiB snapshot: seconds; generous for a loaded machine.
VERIFY_TIMEOUT = 120.0


def test_verify_after_a_restore_reads_the_memfds_the_instance_maps(
        platform: RunningPlatform) -> None:
    deployed = platform.deploy(FIXTURES / "weights")
    assert deployed.status_code in (200, 201), deployed.text
    assert deployed.json()["start_mode"] == "restore", deployed.json()
    cold = platform.invoke("weights")
    assert cold.status_code == 200, cold.text
    assert cold.headers["X-Thaw-Start"] == "restore"
    snap = platform.http.get("/v1/snapshots/weights").json()
    host = snap["manifest"]["arenas"]["host"]["size"]
    assert host >= 16 * 1024 * 1024

    verified = platform.http.post("/v1/functions/weights/verify",
                                  timeout=VERIFY_TIMEOUT).json()
    assert verified["ok"] and verified["bad"] == [] and verified["errors"] == [], verified
    # Every chunk once (at most the raw bytes: shared chunks are read once), and then
    # the host arena's memfd that the instance maps, whole.
    chunks = sum(a["size"] for a in snap["manifest"]["arenas"].values())
    assert verified["bytes"] >= host + chunks - 64 * 1024, (verified, snap)


def test_a_restored_instance_cannot_change_the_memfds_it_was_handed(
        platform: RunningPlatform) -> None:
    """The tenant's own code, in on_restore() while its descriptors are still open,
    under its own uid: every way to change a snapshot memfd is refused, and the node's
    verify pass afterwards still finds them sealed and right."""
    deployed = platform.deploy(FIXTURES / "arena_writer")
    assert deployed.status_code in (200, 201), deployed.text
    assert deployed.json()["start_mode"] == "restore", deployed.json()
    cold = platform.invoke("arena-writer")
    assert cold.status_code == 200, cold.text
    assert cold.headers["X-Thaw-Start"] == "restore"
    seen = cold.json()
    if os.geteuid() == 0:  # an agent that may switch uids sandboxes it under the tenant's
        assert seen["uid"] != os.getuid(), seen
    kinds = {name.removeprefix("/memfd:thaw-").split("-")[0] for name in seen["tried"]}
    assert {"arena", "meta", "pickle"} <= kinds, seen["tried"]
    for name, tried in seen["tried"].items():
        assert tried["pwrite"] == "EPERM" and tried["ftruncate"] == "EPERM", (name, tried)
        assert tried["mmap_shared_write"] == "EPERM", (name, tried)
        assert tried["reopen_and_write"] in ("EPERM", "EACCES"), (name, tried)
        assert tried["add_seals"] == "EPERM", (name, tried)
    assert seen["private_write"] == "done" and seen["intact"], seen

    verified = platform.http.post("/v1/functions/arena-writer/verify",
                                  timeout=VERIFY_TIMEOUT).json()
    assert verified["ok"] and verified["bad"] == [], verified
