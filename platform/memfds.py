"""Sealed memfds: host memory the node agent fills once, then hands to instances as
file descriptors (SCM_RIGHTS over their control sockets) for them to map copy-on-write.
An instance's /proc/self/maps names such a mapping "/memfd:thaw-…"; no path of the
node's snapshot store ever reaches it."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Callable

from thaw.core.memfd import MADV_POPULATE_WRITE, add_seals, populate

# Once filled, an arena's memfd is sealed: nobody (an instance holding the descriptor
# included) can write, grow or shrink it, or lift the seals. Instances map it MAP_PRIVATE,
# which a write seal allows.
ARENA_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
# Prefix of every memfd the node makes; an instance's /proc/self/maps shows "/memfd:<name>".
MEMFD_PREFIX = "thaw-"


class SealedMemfd:
    """A memfd holding bytes that no longer change. The agent keeps the descriptor and
    sends it to instances (SCM_RIGHTS); closing it here leaves their copies and mappings
    alone."""

    def __init__(self, name: str, size: int,
                 fill: Callable[[memoryview], None] | None = None) -> None:
        """`fill(view)` writes the `size` bytes through a writable mapping, which is
        gone before the seals go on."""
        self.name = name
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            if size:
                os.ftruncate(self.fd, size)
                if fill is not None:
                    with mmap.mmap(self.fd, size) as mm:
                        # Fault the pages in up front: first-touch writes inside the copy
                        # run several times slower than the copy itself.
                        with contextlib.suppress(OSError, ValueError):
                            populate(mm, MADV_POPULATE_WRITE)
                        with memoryview(mm) as view:
                            fill(view)
            add_seals(self.fd, ARENA_SEALS)
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def of_bytes(cls, name: str, data: bytes) -> SealedMemfd:
        def fill(view: memoryview) -> None:
            view[:] = data

        return cls(name, len(data), fill)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def missing_seals(fd: int) -> list[str]:
    """Which of ARENA_SEALS the memfd `fd` lacks, by name ([] when it has them all)."""
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    return [name for name, seal in _SEAL_NAMES if not seals & seal]


_SEAL_NAMES = (("F_SEAL_WRITE", fcntl.F_SEAL_WRITE), ("F_SEAL_SHRINK", fcntl.F_SEAL_SHRINK),
               ("F_SEAL_GROW", fcntl.F_SEAL_GROW), ("F_SEAL_SEAL", fcntl.F_SEAL_SEAL))


def text_memfd(name: str, text: str) -> int:
    """A sealed memfd holding `text`, its descriptor the caller's to close."""
    memfd = SealedMemfd.of_bytes(name, text.encode())
    fd = memfd.fd
    memfd.fd = -1
    return fd
