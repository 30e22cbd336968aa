"""Host device slices: best-fit packing, no oversubscription, zeroed between tenants."""

import mmap
import os
from pathlib import Path

import pytest

from thaw.core.errors import OutOfMemory
from thaw.platform.devices import HostDevices, SliceDescriptor

MiB = 1024 * 1024
CANARY = b"\xde\xad\xbe\xef" * 1024


def test_best_fit_and_refusal(tmp_path: Path) -> None:
    devices = HostDevices([64 * MiB, 32 * MiB], tmp_path)
    a = devices.allocate(24 * MiB, "a")
    assert a.device_id == "host1"  # the snugger device
    b = devices.allocate(24 * MiB, "b")
    assert b.device_id == "host0"
    with pytest.raises(OutOfMemory, match="largest free"):
        devices.allocate(48 * MiB, "c")  # 40 MiB and 8 MiB are free: never split
    used = {u.id: u.used for u in devices.usage()}
    assert used == {"host0": 24 * MiB, "host1": 24 * MiB}
    devices.release(a.id)
    assert {u.id: u.used for u in devices.usage()}["host1"] == 0


def test_a_released_slice_never_shows_its_bytes_to_the_next_tenant(tmp_path: Path) -> None:
    devices = HostDevices([16 * MiB], tmp_path)
    first = devices.allocate(8 * MiB, "tenant-a")
    # What the instance does with its slice: map its memfd shared and write.
    with mmap.mmap(first.fd, 0) as mm:
        for offset in range(0, 8 * MiB, len(CANARY)):
            mm[offset:offset + len(CANARY)] = CANARY
    devices.release(first.id)
    for _ in range(3):
        nxt = devices.allocate(8 * MiB, "tenant-b")
        data = os.pread(nxt.fd, 8 * MiB + 1, 0)
        assert len(data) == 8 * MiB and data.count(b"\xde\xad") == 0
        devices.release(nxt.id)


def test_a_host_slice_is_a_sealed_memfd_the_instance_cannot_resize(tmp_path: Path) -> None:
    devices = HostDevices([16 * MiB], tmp_path)
    sl = devices.allocate(4 * MiB, "tenant-a")
    assert os.readlink(f"/proc/self/fd/{sl.fd}").startswith(f"/memfd:thaw-slice-{sl.id}")
    assert sl.descriptor() == SliceDescriptor(kind="host", size=4 * MiB)
    # Booked 4 MiB: the holder may write in place, never grow or shrink it.
    for size in (64 * MiB, MiB):
        with pytest.raises(PermissionError):
            os.ftruncate(sl.fd, size)
    os.pwrite(sl.fd, b"x", 0)
    devices.release(sl.id)
    # Released: the agent's descriptor is closed (its number may be reused since).
    try:
        target = os.readlink(f"/proc/self/fd/{sl.fd}")
    except FileNotFoundError:
        target = ""
    assert not target.startswith(f"/memfd:thaw-slice-{sl.id}")
    assert not list(tmp_path.iterdir())  # no files anywhere
