"""The cuda slice lifecycle: `SliceRecord.move` takes exactly the edges the lifecycle
has and refuses (and logs) every other one."""

from __future__ import annotations

import itertools

import pytest
from structlog.testing import capture_logs

from thaw.platform.cuda import CudaDeviceInfo, IllegalSliceTransition, SliceState
from thaw.platform.cuda.slices import DeviceBook, SliceRecord

EDGES = {
    (SliceState.ALLOCATING, SliceState.READY),
    (SliceState.ALLOCATING, SliceState.FREED),
    (SliceState.READY, SliceState.ZEROING),
    (SliceState.ZEROING, SliceState.FREED),
    (SliceState.ZEROING, SliceState.QUARANTINED),
    (SliceState.QUARANTINED, SliceState.ZEROING),
}


def record_in(state: SliceState) -> SliceRecord:
    info = CudaDeviceInfo(index=0, name="Fake GPU", pci_bus_id="0000:01:00.0",
                          uuid="GPU-0", total_bytes=1 << 30)
    book = DeviceBook(info, "cuda0", 1 << 30)
    record = SliceRecord(id="fn-1", device=book, size=4096, allocated=4096, booked=4096,
                         compute_percent=0, state=state)
    book.records[record.id] = record
    return record


@pytest.mark.parametrize(("state", "target"), sorted(EDGES))
def test_each_edge_of_the_lifecycle_is_taken(state: SliceState, target: SliceState) -> None:
    record = record_in(state)
    record.move(target)
    assert record.state is target


@pytest.mark.parametrize(("state", "target"),
                         sorted(set(itertools.product(SliceState, SliceState)) - EDGES))
def test_every_other_move_is_refused_and_logged(state: SliceState,
                                                target: SliceState) -> None:
    record = record_in(state)
    with capture_logs() as logs, pytest.raises(IllegalSliceTransition, match="cannot move"):
        record.move(target)
    assert record.state is state
    assert [(e["event"], e["slice"], e["state"], e["target"]) for e in logs] == [
        ("illegal slice transition refused", "fn-1", state.value, target.value)]


def test_a_quarantined_slice_stays_booked() -> None:
    record = record_in(SliceState.READY)
    record.move(SliceState.ZEROING)
    record.move(SliceState.QUARANTINED)
    assert record.device.booked == 4096 and record.device.free == (1 << 30) - 4096
