"""A restore's GPU slice allocates only the snapshot's device arena and books the rest
for the instance's own allocator, which is capped at exactly that rest: the device
memory an instance can take is its slice, counted once."""

from __future__ import annotations

import pytest

from thaw.core.errors import InvalidArgument
from thaw.platform.cuda import CudaDevices, InMemoryCudaApi
from thaw.platform.devices import HostDevices
from thaw.platform.slice_fill import slice_handover
from thaw.snapshotter.runtime.events import SliceDescriptor

KiB = 1024
PAGE = 4 * KiB


def backend(total: int) -> tuple[CudaDevices, InMemoryCudaApi]:
    api = InMemoryCudaApi([total])
    return CudaDevices(api, reserve_bytes=0, instance_overhead_bytes=0,
                       granularity=PAGE), api


def test_a_restore_slice_allocates_its_arena_and_books_the_whole_slice() -> None:
    devices, api = backend(1024 * KiB)
    sl = devices.allocate(256 * KiB, "fn", restore=True, resident=10 * KiB)
    try:
        # Device memory: the arena, rounded to whole pages; the books: the whole slice.
        assert sl.allocated == 12 * KiB and sl.size == 256 * KiB
        assert [c[2] for c in api.calls_named("malloc")] == [12 * KiB]
        assert [u.used for u in devices.usage()] == [256 * KiB]
        descriptor, fd = slice_handover(sl)
        assert fd is None
        assert (descriptor.size, descriptor.limit) == (12 * KiB, 256 * KiB)
        # Another slice sees the booked rest as taken.
        with pytest.raises(Exception, match="no GPU has room"):
            devices.allocate(800 * KiB, "other")
    finally:
        devices.release(sl.id)
    assert [u.used for u in devices.usage()] == [0]


def test_without_resident_the_whole_slice_is_allocated() -> None:
    devices, api = backend(1024 * KiB)
    sl = devices.allocate(256 * KiB, "fn")
    try:
        assert sl.allocated == 256 * KiB
        assert [c[2] for c in api.calls_named("malloc")] == [256 * KiB]
        descriptor, _ = slice_handover(sl)
        assert (descriptor.size, descriptor.limit) == (256 * KiB, 256 * KiB)
    finally:
        devices.release(sl.id)


def test_an_empty_arena_still_gets_a_page_to_open_by_handle() -> None:
    devices, api = backend(1024 * KiB)
    sl = devices.allocate(256 * KiB, "fn", restore=True, resident=0)
    try:
        assert sl.allocated == PAGE and sl.ipc_handle
    finally:
        devices.release(sl.id)


@pytest.mark.parametrize("resident", [-1, True, 1.5])
def test_resident_must_be_a_byte_count(resident: object) -> None:
    devices, _ = backend(1024 * KiB)
    with pytest.raises(InvalidArgument, match="resident"):
        devices.allocate(256 * KiB, "fn", resident=resident)  # type: ignore[arg-type]


def test_host_slices_are_whole_whatever_the_restore_fills(tmp_path) -> None:  # type: ignore[no-untyped-def]
    devices = HostDevices([1024 * KiB], tmp_path)
    sl = devices.allocate(256 * KiB, "fn", restore=True, resident=10 * KiB)
    try:
        descriptor, fd = slice_handover(sl)
        assert fd is not None and descriptor.size == 256 * KiB
        assert (descriptor.limit or descriptor.size) == 256 * KiB
    finally:
        devices.release(sl.id)


def test_a_descriptor_limit_below_its_size_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        SliceDescriptor(kind="cuda", size=8 * KiB, limit=4 * KiB, ipc_handle="00" * 64)
    assert SliceDescriptor.from_record(
        SliceDescriptor(kind="cuda", size=4 * KiB, limit=8 * KiB, ipc_handle="00" * 64
                        ).to_record()).limit == 8 * KiB
