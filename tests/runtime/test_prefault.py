"""Restores prefault the host arena on a background thread (restore.Prefault): the
restored objects hold the same bytes with and without it, and a kernel that refuses
MADV_POPULATE_READ only leaves pages to fault in on first touch."""

from __future__ import annotations

import errno
import mmap
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch

from thaw.snapshotter.runtime import restore
from thaw.snapshotter.runtime.capture import capture
from thaw.snapshotter.runtime.restore import Prefault, RestoreError, populate, restore_handler


class Holder:
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(7)
        self.weights = torch.randn(256, 1024, generator=generator)
        self.table = numpy.arange(300_000, dtype=numpy.int64) * 3
        self.blob = bytes(range(256)) * 2048


def _restore(out: Path, prefault: bool) -> tuple[Any, dict[str, float]]:
    meta = capture(Holder(), out, modules=[], timings={})
    restored = restore_handler(meta, out / "state.pickle", out / "host.arena",
                               prefault=prefault)
    return restored.handler, restored.timings


def test_prefault_on_and_off_restore_identical_bytes(tmp_path: Path) -> None:
    on, timings_on = _restore(tmp_path / "on", prefault=True)
    off, timings_off = _restore(tmp_path / "off", prefault=False)
    assert on.weights.numpy().tobytes() == off.weights.numpy().tobytes()
    assert on.weights.numpy().tobytes() == Holder().weights.numpy().tobytes()
    assert on.table.tobytes() == off.table.tobytes() == Holder().table.tobytes()
    assert on.blob == off.blob == Holder().blob
    assert timings_on["prefault"] >= 0.0 and "prefault" not in timings_off
    # The mapping stays copy-on-write after it was populated: a write is private.
    on.weights[0, 0] = 42.0
    again, _ = _restore(tmp_path / "again", prefault=True)
    assert float(again.weights[0, 0]) != 42.0


def test_populate_reads_a_private_mapping_without_changing_it(tmp_path: Path) -> None:
    path = tmp_path / "arena"
    path.write_bytes(b"\x5a" * (3 * mmap.PAGESIZE))
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    populate(mapping)  # True on Linux >= 5.14, False (refused) before: both are fine
    assert mapping[:] == b"\x5a" * (3 * mmap.PAGESIZE)
    mapping.close()  # populate released its export of the buffer
    assert path.read_bytes() == b"\x5a" * (3 * mmap.PAGESIZE)


def test_a_kernel_refusing_populate_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> int:
        import ctypes

        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(restore, "_madvise", refuse)
    mapping = mmap.mmap(-1, mmap.PAGESIZE)
    assert populate(mapping) is False
    assert Prefault(mapping).join() >= 0.0


def test_a_real_fault_is_reported_on_join(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object) -> int:
        import ctypes

        ctypes.set_errno(errno.EFAULT)
        return -1

    monkeypatch.setattr(restore, "_madvise", fail)
    with pytest.raises(RestoreError, match="prefaulting the host arena failed"):
        Prefault(mmap.mmap(-1, mmap.PAGESIZE)).join()
