"""A restored instance gets its snapshot as sealed memfds and its slice as a descriptor,
never as paths (DESIGN.md §6): checked from inside the instance, which answers with what
it sees (its mappings, command line, environment and the spawn request it got)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES, RunningPlatform

torch = pytest.importorskip("torch")


def expected_output() -> float:
    """What the probe's model answers, built here from the same seed."""
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 64)).eval()
    with torch.no_grad():
        return float(model(torch.ones(1, 256)).sum().item())


def store_paths(home: Path) -> list[str]:
    """The node's snapshot store: its chunk folders and its host-memory snapshot
    folders."""
    chunks = [str(p) for p in home.glob("agent/*/chunks")]
    shm = [str(p) for p in Path("/dev/shm").glob(f"thaw-*-{os.getuid()}/snapshots")]
    assert chunks, "the agent's chunk store was not found"
    return chunks + shm


def test_weights_live_in_sealed_memfds_and_no_store_path_reaches_the_instance(
        platform: RunningPlatform) -> None:
    check_restored_from_descriptors(platform)


def check_restored_from_descriptors(platform: RunningPlatform) -> dict[str, Any]:
    """Deploy the probe, restore it cold and check what it saw; returns that."""
    resp = platform.deploy(FIXTURES / "memfd_probe")
    assert resp.status_code == 201, resp.text
    assert resp.json()["start_mode"] == "restore", resp.json()
    cold = platform.invoke("memfd-probe")
    assert cold.status_code == 200, cold.text
    assert cold.headers["X-Thaw-Start"] == "restore"
    seen = cold.json()
    assert seen["setup_pid"] != seen["pid"]  # restored, not set up

    # Every weight is a view into the snapshot's arena memfd: no copy was made.
    assert seen["weights"], seen
    for name, mapping in seen["weights"].items():
        assert mapping.startswith("/memfd:thaw-arena-"), (name, mapping)
    # Its slice arrived as a descriptor too, and is mapped.
    assert any(m.startswith("/memfd:thaw-slice-") for m in seen["memfds"]), seen["memfds"]
    assert seen["output"] == pytest.approx(expected_output(), rel=1e-6)

    received = seen["received"]
    assert received is not None
    assert set(received["fds"]) == {"snapshot_json", "pickle", "host_arena", "slice"}
    assert received["slice"]["kind"] == "host" and received["slice"]["size"] == 64 << 20
    told = [*seen["cmdline"], *seen["environ"], *seen["os_environ"], received["socket"],
            received["log"], *received["env"].values()]
    for path in store_paths(platform.platform.home):
        assert not [word for word in told if path in word], path
    # Nor does any word name a snapshot file (the store's former layout).
    for word in told:
        assert "state.pickle" not in word and ".arena" not in word, word
        assert "snapshot.json" not in word, word
    return seen


def test_a_function_that_initialises_cuda_at_import_restores_without_fork(
        platform: RunningPlatform) -> None:
    """Its template may not fork: the agent restores it in a fresh interpreter (restore
    mode) with the same descriptors, and the snapshot is not quarantined."""
    resp = platform.deploy(FIXTURES / "cuda_at_import")
    assert resp.status_code == 201, resp.text
    assert resp.json()["start_mode"] == "restore", resp.json()
    cold = platform.invoke("cuda-at-import")
    assert cold.status_code == 200, cold.text
    assert cold.headers["X-Thaw-Start"] == "restore"
    answer = cold.json()
    assert answer["answer"] == 42  # set by setup() in the build, restored here
    # Not forked from a template: its parent is the agent that launched it.
    with open(f"/proc/{answer['ppid']}/cmdline", "rb") as handle:
        parent = handle.read().split(b"\0")
    assert b"template" not in parent and b"agent" in parent, parent
    fn = platform.http.get("/v1/functions/cuda-at-import")
    assert fn.status_code == 200, fn.text
    assert fn.json()["start_mode"] == "restore", fn.json()  # its snapshot still serves
