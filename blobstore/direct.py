"""Reading a chunk file into its destination by the fastest way the kernel offers.

A chunk wholly in the page cache (a snapshot just stored, or restored a moment ago) is
read from there (mincore(2) tells, without starting any I/O). One that is not is read
with O_DIRECT, from the device straight into the
destination: no copy through the page cache, and no dependence on the kernel's readahead
window, which on the measured VM held buffered cold reads to ~0.35 GB/s per thread
where O_DIRECT reads reach the device's bandwidth once enough are in flight
(blobstore/pipeline.py READS_IN_FLIGHT).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from pathlib import Path

import numpy as np

# O_DIRECT wants the buffer address, the file offset and the length aligned to the
# device's logical block; a page is a multiple of every block size Linux supports.
DIRECT_ALIGNMENT = 4096

_REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


_libc = ctypes.CDLL(None, use_errno=True)
_mincore = _libc.mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_mincore.restype = ctypes.c_int


class DirectRefused(Exception):
    """The filesystem refuses O_DIRECT (tmpfs, some FUSE): read buffered instead."""


def is_cached(fd: int, size: int) -> bool:
    """Whether every page of the file's first `size` bytes is in the page cache, asked
    with mincore(2) on a mapping that is never touched: unlike a read, asking starts no
    I/O (a `preadv(RWF_NOWAIT)` probe was measured to start readahead that then raced the
    O_DIRECT reads for the device)."""
    if size == 0:
        return True
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapping:
        array = np.frombuffer(mapping, dtype=np.uint8)
        try:
            result = _mincore(array.ctypes.data, size, vector)
        finally:
            del array  # the mapping cannot close while an array exports it
    if result != 0:
        return False  # cannot tell: reading from the device is always correct
    return all(byte & 1 for byte in bytes(vector))


def read_direct(path: Path, out: memoryview) -> int:
    """Read the file into `out` with O_DIRECT, as far as the alignment rules allow;
    returns the bytes of `out` filled (the rest is for a buffered read). DirectRefused
    if the filesystem does not support O_DIRECT at all."""
    start = 0
    end = len(out) // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
    if end == 0 or _address(out) % DIRECT_ALIGNMENT:
        return 0  # unaligned: the buffered read does it
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno in _REFUSED:
            raise DirectRefused(str(exc)) from exc
        raise
    try:
        at = start
        while at < end:
            try:
                count = os.preadv(fd, [out[at:end]], at)
            except OSError as exc:
                if exc.errno in _REFUSED and at == 0:
                    raise DirectRefused(str(exc)) from exc
                raise
            if count == 0 or count % DIRECT_ALIGNMENT:
                return at + count  # end of file or a short read: finish buffered
            at += count
        return at
    finally:
        os.close(fd)


def _address(view: memoryview) -> int:
    """Where `view`'s first byte sits in memory."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
