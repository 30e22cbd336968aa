"""On a running platform, `POST /v1/functions/{name}/verify` (what `thaw snapshot
verify` calls) checks what a restore mapped: after a cold start the node's sealed
memfds of the snapshot are read and hashed too, not only its chunks on disk."""

from __future__ import annotations

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
