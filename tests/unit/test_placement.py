"""Placement is pure: nodes nearer the snapshot first, then fewer starts, then best fit."""

from thaw.scheduler.placement import Candidate, choose_node

GiB = 1024**3


def test_prefers_pinned_then_disk_then_any() -> None:
    nodes = [Candidate("any", [8 * GiB]), Candidate("disk", [8 * GiB], snapshot_on_disk=True),
             Candidate("pinned", [8 * GiB], snapshot_pinned=True)]
    assert choose_node(nodes, GiB).node_id == "pinned"
    assert choose_node(nodes[:2], GiB).node_id == "disk"


def test_spreads_concurrent_starts() -> None:
    nodes = [Candidate("busy", [8 * GiB], snapshot_on_disk=True, starts_in_flight=2),
             Candidate("idle", [8 * GiB], snapshot_on_disk=True)]
    assert choose_node(nodes, GiB).node_id == "idle"


def test_best_fit_on_one_device() -> None:
    nodes = [Candidate("roomy", [16 * GiB]), Candidate("snug", [3 * GiB, 2 * GiB])]
    assert choose_node(nodes, 2 * GiB).node_id == "snug"
    # A slice never spans devices: 4 GiB does not fit in 3+2.
    assert choose_node(nodes, 4 * GiB).node_id == "roomy"
    assert choose_node(nodes, 32 * GiB) is None
