"""add_seals: a transient EBUSY from F_ADD_SEALS is tried again; anything else, or an
EBUSY that lasts, is raised. populate: a mapping's pages faulted in by one madvise."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from typing import Any

import pytest

from thaw.core import memfd
from thaw.core.memfd import SEAL_ATTEMPTS, add_seals

WRITE_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
REAL_FCNTL = fcntl.fcntl


def written_memfd() -> int:
    fd = os.memfd_create("seal-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, mmap.PAGESIZE)
    with mmap.mmap(fd, mmap.PAGESIZE) as mapping:
        mapping[:5] = b"hello"
    return fd


class Flaky:
    """fcntl that answers EBUSY `busy` times before doing the real call."""

    def __init__(self, busy: int, err: int = errno.EBUSY) -> None:
        self.busy, self.err, self.calls = busy, err, 0

    def __call__(self, fd: int, cmd: int, arg: Any = 0) -> Any:
        self.calls += 1
        if cmd == fcntl.F_ADD_SEALS and self.calls <= self.busy:
            raise OSError(self.err, os.strerror(self.err))
        return REAL_FCNTL(fd, cmd, arg)


def test_seals_at_once_when_the_kernel_agrees() -> None:
    fd = written_memfd()
    try:
        add_seals(fd, WRITE_SEALS)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & WRITE_SEALS == WRITE_SEALS
    finally:
        os.close(fd)


def test_a_transient_ebusy_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = Flaky(busy=3)
    monkeypatch.setattr(memfd.fcntl, "fcntl", flaky)
    monkeypatch.setattr(memfd, "wait_exponential", lambda **_: lambda _state: 0)
    fd = written_memfd()
    try:
        add_seals(fd, WRITE_SEALS)
        assert flaky.calls == 4
        monkeypatch.undo()
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & WRITE_SEALS == WRITE_SEALS
    finally:
        os.close(fd)


def test_a_lasting_ebusy_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = Flaky(busy=SEAL_ATTEMPTS + 5)
    monkeypatch.setattr(memfd.fcntl, "fcntl", flaky)
    monkeypatch.setattr(memfd, "wait_exponential", lambda **_: lambda _state: 0)
    with pytest.raises(OSError) as caught:
        add_seals(0, WRITE_SEALS)
    assert caught.value.errno == errno.EBUSY and flaky.calls == SEAL_ATTEMPTS


def test_other_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = Flaky(busy=5, err=errno.EPERM)
    monkeypatch.setattr(memfd.fcntl, "fcntl", flaky)
    with pytest.raises(OSError) as caught:
        add_seals(0, WRITE_SEALS)
    assert caught.value.errno == errno.EPERM and flaky.calls == 1


def test_populate_faults_every_page_in_read_only_mappings_included() -> None:
    size = 64 * mmap.PAGESIZE
    fd = os.memfd_create("populate-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        assert os.fstat(fd).st_blocks == 0  # nothing backs it yet
        with mmap.mmap(fd, size) as writable:
            memfd.populate(writable, memfd.MADV_POPULATE_WRITE)
        assert os.fstat(fd).st_blocks * 512 >= size  # every page allocated
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as readable:
            memfd.populate(readable, memfd.MADV_POPULATE_READ)
            # Writing into a read-only mapping is refused, and said so.
            with pytest.raises(OSError) as refused:
                memfd.populate(readable, memfd.MADV_POPULATE_WRITE)
            assert refused.value.errno in (errno.EFAULT, errno.EPERM, errno.EINVAL)
    finally:
        os.close(fd)
