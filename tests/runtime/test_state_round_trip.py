"""build -> restore round trips: each kind of state a handler holds comes back equal to a
fresh start's, sharing what it shared, mapped rather than copied (DESIGN.md §4)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    Client,
    Processes,
    Snapshot,
    TemplateHandle,
    start_build,
    start_fresh,
    start_restore,
    start_template,
    wait_ready,
)

STATE_BUNDLES = (
    "tensors_rt", "module_tree_rt", "numpy_rt", "bytes_state_rt", "containers_rt",
    "user_classes_rt",
)


@dataclass
class State:
    snapshot: Snapshot
    fresh: str  # socket of a fresh instance of the same bundle
    template: TemplateHandle


@pytest.fixture(scope="module")
def states(
    module_processes: Processes, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, State]:
    # Builds and fresh starts run side by side: most of their time is importing torch.
    out = tmp_path_factory.mktemp("snapshots")
    fresh = {name: start_fresh(module_processes, name) for name in STATE_BUNDLES}
    builds = {name: start_build(module_processes, name, out / name) for name in STATE_BUNDLES}
    snapshots = {name: builds[name].snapshot() for name in STATE_BUNDLES}
    templates = {name: start_template(module_processes, snapshots[name]) for name in STATE_BUNDLES}
    for process, _ in fresh.values():
        wait_ready(process)
    return {
        name: State(snapshots[name], fresh[name][1], templates[name]) for name in STATE_BUNDLES
    }


def call(socket_path: str, payload: Any = None) -> Any:
    client = Client(socket_path)
    try:
        response = client.invoke(payload if payload is not None else {})
        assert response.status == 200, response.body
        return response.json()
    finally:
        client.close()


def restored(states: dict[str, State], name: str, processes: Processes) -> str:
    return states[name].template.spawn(processes).socket


def test_cpu_tensors_equal_fresh(states: dict[str, State], processes: Processes) -> None:
    fresh = call(states["tensors_rt"].fresh)
    again = call(restored(states, "tensors_rt", processes))
    assert again == fresh
    assert again["param"]["type"] == "Parameter" and again["param"]["requires_grad"]
    assert again["half"]["dtype"] == "torch.bfloat16"


def test_views_and_their_base_share_memory_after_restore(
    states: dict[str, State], processes: Processes
) -> None:
    instance = restored(states, "tensors_rt", processes)
    described = call(instance)
    assert described["same_storage"]["window"] and described["same_storage"]["matrix"]
    assert described["matrix"]["stride"] == [1, 100]
    # A write through the view shows in the base, and in the transposed view.
    written = call(instance, {"action": "write_views"})
    assert written["base_10_20"] == [-1.0] * 10
    assert written["matrix_col0_head"] == [float(i) for i in range(10)] + [-1.0, -1.0]


def test_several_tensors_on_one_storage_stay_one_storage(
    states: dict[str, State], processes: Processes
) -> None:
    state = states["tensors_rt"]
    # 11 tensors, 7 storages: views and re-typed tensors reuse their storage's entry.
    torch_entries = [s for s in state.snapshot.meta["storages"] if s["kind"] == "torch"]
    assert len(torch_entries) == 7
    instance = restored(states, "tensors_rt", processes)
    described = call(instance)
    assert described["same_storage"]["as_floats"] and described["same_storage"]["tail"]
    assert described["offsets"] == [10, 2048]
    written = call(instance, {"action": "write_views"})
    assert written["raw_head"] == [0, 0, 128, 63]  # 1.0f written through the float view
    assert written["raw_2048"] == 42  # written through the tensor at offset 2048


def test_arena_offsets_are_page_aligned(states: dict[str, State]) -> None:
    for name in ("tensors_rt", "numpy_rt", "bytes_state_rt"):
        meta = states[name].snapshot.meta
        assert all(entry["offset"] % 4096 == 0 for entry in meta["storages"])
        assert meta["host_size"] % 4096 == 0
        assert meta["host_size"] == (states[name].snapshot.folder / "host.arena").stat().st_size


def test_restored_instance_maps_the_arena_and_writes_stay_private(
    states: dict[str, State], processes: Processes
) -> None:
    state = states["tensors_rt"]
    arena = state.snapshot.folder / "host.arena"
    before = hashlib.sha256(arena.read_bytes()).hexdigest()
    instance = state.template.spawn(processes)
    maps = Path(f"/proc/{instance.pid}/maps").read_text()
    assert str(arena) in maps  # zero-copy: tensors point into the mapping
    call(instance.socket, {"action": "write_views"})
    assert hashlib.sha256(arena.read_bytes()).hexdigest() == before  # copy-on-write
    # ...so the next restore starts from the snapshot, not from the last one's writes.
    assert call(restored(states, "tensors_rt", processes)) == call(state.fresh)


def test_module_tree_equal_fresh_with_tied_weights(
    states: dict[str, State], processes: Processes
) -> None:
    ids = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]]
    fresh = call(states["module_tree_rt"].fresh, {"ids": ids})
    again = call(restored(states, "module_tree_rt", processes), {"ids": ids})
    assert again == fresh
    assert again["tied"] is True
    assert again["training"] is False
    assert again["num_batches_tracked"] == 1


def test_numpy_arrays_equal_fresh_and_zero_copy(
    states: dict[str, State], processes: Processes
) -> None:
    fresh = call(states["numpy_rt"].fresh)
    instance = restored(states, "numpy_rt", processes)
    again = call(instance)
    assert again.pop("big_owns_data") is False  # a view over the mapped arena
    assert fresh.pop("big_owns_data") is True
    assert again == fresh
    assert again["alias_is_big"] and again["fortran"]["f_contiguous"]
    assert again["frozen"]["writeable"] is False and again["big"]["writeable"] is True
    assert call(instance, {"action": "write"}) == {"big00": 123.0, "alias00": 123.0}
    buffers = [s for s in states["numpy_rt"].snapshot.meta["storages"] if s["kind"] == "buffer"]
    # big, fortran, frozen and records go out of band; small and objects stay in-band.
    assert len(buffers) == 4


def test_bytes_and_bytearray_equal_fresh(states: dict[str, State], processes: Processes) -> None:
    fresh = call(states["bytes_state_rt"].fresh)
    instance = restored(states, "bytes_state_rt", processes)
    assert call(instance) == fresh
    assert fresh["shared"] is True
    assert call(instance, {"action": "append"}) == {"buffer_len": 300_001}
    buffers = [s for s in states["bytes_state_rt"].snapshot.meta["storages"]
               if s["kind"] == "buffer"]
    # The 1 MiB blob, referenced three times, is stored once; "tiny" stays in the pickle.
    assert sorted(b["nbytes"] for b in buffers) == [300_000, 1 << 20]


def test_nested_containers_equal_fresh(states: dict[str, State], processes: Processes) -> None:
    fresh = call(states["containers_rt"].fresh)
    assert call(restored(states, "containers_rt", processes)) == fresh
    assert fresh["shared"] and fresh["cycle"]


def test_user_classes_equal_fresh(states: dict[str, State], processes: Processes) -> None:
    fresh = call(states["user_classes_rt"].fresh)
    again = call(restored(states, "user_classes_rt", processes))
    assert again == fresh
    assert again["vocab"] == ["helpers", 1]
    assert again["child_owner_is_self"] is True


def test_snapshot_json_records_modules_and_fingerprint(states: dict[str, State]) -> None:
    meta = states["tensors_rt"].snapshot.meta
    assert meta["format"] == 1
    modules = meta["modules"]
    assert "torch" in modules and "app" in modules
    assert "thaw.snapshotter.runtime" not in modules
    fingerprint = meta["fingerprint"]
    assert fingerprint["torch"].startswith("2.") and fingerprint["device_type"] == "host"
    assert set(fingerprint) == {"python", "torch", "numpy", "device_type", "gpu_model", "driver",
                                "function_version", "compute_capability"}
    assert set(meta["timings"]) == {"import", "setup", "capture"}
    assert meta["device_size"] == 0
    assert (states["tensors_rt"].snapshot.folder / "device.arena").stat().st_size == 0
    captured = states["tensors_rt"].snapshot.captured
    assert captured["host_size"] == meta["host_size"] and captured["device_size"] == 0
    assert set(captured["timings"]) == {"import", "setup", "capture"}


def test_restore_mode_in_a_plain_process(states: dict[str, State], processes: Processes) -> None:
    snapshot = states["tensors_rt"].snapshot
    socket_path = processes.socket_path("restore")
    process, _answers = start_restore(processes, snapshot, socket_path)
    ready = wait_ready(process)
    assert ready["pid"] == process.pid
    # The tensors' host arena was prefaulted while unpickling (restore.Prefault).
    assert set(ready["timings"]) == {"import", "map", "unpickle", "prefault", "on_restore"}
    assert call(socket_path) == call(states["tensors_rt"].fresh)


def test_restore_of_a_truncated_arena_fails_cleanly(
    states: dict[str, State], processes: Processes, tmp_path: Path
) -> None:
    snapshot = states["tensors_rt"].snapshot
    short = tmp_path / "host.arena"
    short.write_bytes((snapshot.folder / "host.arena").read_bytes()[:8192])
    socket_path = processes.socket_path("restore")
    request = snapshot.spawn_request(socket_path, tmp_path / "restore.log")
    request["host_arena"] = str(short)
    process, _answers = start_restore(processes, snapshot, socket_path, request)
    event = process.event()
    assert event["event"] == "failed" and event["stage"] == "restore"
    assert "RestoreError: host arena" in event["reason"] and "snapshot needs" in event["reason"]
    assert process.wait() == 13


def test_restore_refuses_a_mismatching_fingerprint(
    states: dict[str, State], processes: Processes, tmp_path: Path
) -> None:
    snapshot = states["containers_rt"].snapshot
    meta = snapshot.meta
    meta["fingerprint"]["python"] = "2.7.18"
    doctored = tmp_path / "snapshot.json"
    doctored.write_text(json.dumps(meta))
    socket_path = processes.socket_path("restore")
    request = snapshot.spawn_request(socket_path, tmp_path / "restore.log")
    request["snapshot_json"] = str(doctored)
    process, _answers = start_restore(processes, snapshot, socket_path, request)
    event = process.event()
    assert event["stage"] == "restore"
    assert event["reason"].startswith("RestoreError: snapshot is for Python 2.7.18")
