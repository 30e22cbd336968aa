"""Host device slices: best-fit packing, no oversubscription, zeroed between tenants."""

import mmap
from pathlib import Path

import pytest

from thaw.core.errors import OutOfMemory
from thaw.platform.devices import HostDevices

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
    with open(first.path, "r+b") as handle, mmap.mmap(handle.fileno(), 0) as mm:
        for offset in range(0, 8 * MiB, len(CANARY)):
            mm[offset:offset + len(CANARY)] = CANARY
    devices.release(first.id)
    for _ in range(3):
        nxt = devices.allocate(8 * MiB, "tenant-b")
        data = Path(nxt.path).read_bytes()
        assert len(data) == 8 * MiB and data.count(b"\xde\xad") == 0
        devices.release(nxt.id)
