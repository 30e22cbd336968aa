"""An instance's device storages are views into its slice (DESIGN.md §6): on the host
backend the slice is a memfd the instance maps shared, already filled by the agent with
the snapshot's device arena; nothing is copied at restore. And what the function
allocates past its slice answers 507 like a host-memory overrun."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.conftest import Processes, build, start_template
from thaw.platform.devices import HostDevices
from thaw.snapshotter.runtime.capture import capture
from thaw.snapshotter.runtime.events import SliceDescriptor
from thaw.snapshotter.runtime.restore import DeviceMemory, RestoreError, restore_handler
from thaw.snapshotter.runtime.server import is_device_out_of_memory
from thaw.snapshotter.runtime.snapshot import SnapshotMeta

torch = pytest.importorskip("torch")

MiB = 1 << 20


class Box:
    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)


def device_snapshot(folder: Path) -> tuple[SnapshotMeta, bytes]:
    """A snapshot whose one tensor lives in the device arena (as a build on a device
    lays it out), and that arena's bytes."""
    meta = capture(Box(t=torch.arange(4096, dtype=torch.float32)), folder, modules=[],
                   timings={})
    record = meta.to_json()
    record["storages"][0].update(arena="device", offset=0)
    record["device_size"], record["host_size"] = record["host_size"], 0
    return SnapshotMeta.from_json(record), (folder / "host.arena").read_bytes()


def mapping_of(address: int) -> str:
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            start, _, end = parts[0].partition("-")
            if int(start, 16) <= address < int(end, 16):
                return parts[5].strip() if len(parts) > 5 else ""
    return ""


def test_device_storages_are_views_into_the_host_slice(tmp_path: Path) -> None:
    meta, arena = device_snapshot(tmp_path)
    devices = HostDevices([64 * MiB])
    sl = devices.allocate(8 * MiB, "fn")
    try:
        os.pwrite(sl.fd, arena, 0)  # what the agent's fill_slice does before the restore
        device = DeviceMemory(sl.descriptor(), sl.fd)
        restored = restore_handler(meta, tmp_path / "state.pickle", None, device=device)
        tensor = restored.handler.t  # type: ignore[attr-defined]
        assert torch.equal(tensor, torch.arange(4096, dtype=torch.float32))
        assert mapping_of(tensor.data_ptr()).startswith(f"/memfd:thaw-slice-{sl.id}")
        # The slice is the instance's own memory: a write lands in it, not in a copy.
        tensor[0] = 7.0
        assert os.pread(sl.fd, 4, 0) == torch.tensor([7.0]).numpy().tobytes()
    finally:
        devices.release(sl.id)


def test_device_storages_need_a_slice_they_fit_in(tmp_path: Path) -> None:
    meta, arena = device_snapshot(tmp_path)
    with pytest.raises(RestoreError, match="was given no slice"):
        restore_handler(meta, tmp_path / "state.pickle", None)
    devices = HostDevices([64 * MiB])
    small = devices.allocate(4096, "fn")
    try:
        with pytest.raises(RestoreError, match="does not fit the slice"):
            restore_handler(meta, tmp_path / "state.pickle", None,
                            device=DeviceMemory(small.descriptor(), small.fd))
    finally:
        devices.release(small.id)
    assert len(arena) > 4096


def test_a_host_slice_without_its_descriptor_is_refused() -> None:
    with pytest.raises(RestoreError, match="needs its descriptor"):
        DeviceMemory(SliceDescriptor(kind="host", size=MiB), None)


def test_a_device_allocation_past_the_slice_reads_as_out_of_memory() -> None:
    assert is_device_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_device_out_of_memory(RuntimeError("CUDA out of memory"))
    assert not is_device_out_of_memory(MemoryError())


def test_a_forked_instance_gets_its_slice_environment_before_it_restores(
        processes: Processes, tmp_path: Path) -> None:
    """What a slice needs in the environment (CUDA_VISIBLE_DEVICES, an MPS share) is
    set in the instance by the spawn request: a fork inherits its template's."""
    snapshot = build(processes, "memfd_probe", tmp_path / "snap")
    template = start_template(processes, snapshot)
    socket_path = processes.socket_path("instance")
    request = snapshot.spawn_request(socket_path, processes.log_dir / "probe.log")
    request["env"] = {"CUDA_VISIBLE_DEVICES": "GPU-test", "THAW_PROBE_MARK": "7"}
    instance = template.spawn(processes, request)
    client = instance.client()
    try:
        seen = client.invoke({}).json()
    finally:
        client.close()
    assert {"CUDA_VISIBLE_DEVICES=GPU-test", "THAW_PROBE_MARK=7"} <= set(seen["os_environ"])
    assert seen["received"]["env"] == request["env"]
    template_environ = Path(f"/proc/{template.process.pid}/environ").read_bytes()
    assert b"THAW_PROBE_MARK" not in template_environ  # the template's stays its own


def test_device_allocations_are_capped_at_the_rest_of_the_cuda_slice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's caching allocator gets what the slice has left past the snapshot's
    device arena, as a fraction of the GPU (torch.cuda.set_per_process_memory_fraction),
    on the slice's device. (A fake torch.cuda records it: no GPU here.)"""
    calls: list[tuple[float, int]] = []

    class Properties:
        total_memory = 80 * 1024 * MiB

    fake_cuda = type("FakeCuda", (), {
        "get_device_properties": staticmethod(lambda device: Properties()),
        "set_per_process_memory_fraction": staticmethod(
            lambda fraction, device: calls.append((fraction, device))),
    })
    monkeypatch.setattr(torch, "cuda", fake_cuda)
    descriptor = SliceDescriptor(kind="cuda", size=8 * 1024 * MiB, ipc_handle="00" * 64)
    memory = DeviceMemory.__new__(DeviceMemory)  # as if open_slice had opened it
    memory.descriptor = descriptor
    memory._host = None
    memory._cuda = type("Opened", (), {"device": 3})()
    memory.bound_allocations(2 * 1024 * MiB)
    assert calls == [(6 / 80, 3)]
    # A restore's slice maps only its arena: the cap is the rest of the whole slice.
    calls.clear()
    memory.descriptor = SliceDescriptor(kind="cuda", size=2 * 1024 * MiB,
                                        limit=8 * 1024 * MiB, ipc_handle="00" * 64)
    memory.bound_allocations(2 * 1024 * MiB)
    assert calls == [(6 / 80, 3)]
    # A host slice needs no cap: its instance's memory is capped by RLIMIT_DATA.
    calls.clear()
    host = DeviceMemory.__new__(DeviceMemory)
    host.descriptor, host._host, host._cuda = SliceDescriptor(kind="host", size=MiB), None, None
    host.bound_allocations(0)
    assert calls == []
