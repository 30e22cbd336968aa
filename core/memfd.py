"""Sealing a memfd that was just written through a mapping, and populating a mapping.

F_SEAL_WRITE is refused with EBUSY while any page of the file holds an extra reference:
the kernel waits for such pins a short while and then gives up. Right after a mapping
is unmapped, pages can still sit in another CPU's LRU batch, each holding a reference
until that batch drains, which on a loaded machine can outlast the kernel's wait. The
refusal is then transient: tried again a few times it succeeds."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

# At most about a second and a half in all (10 ms doubling to 250 ms, 10 tries).
SEAL_ATTEMPTS = 10


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EBUSY


def add_seals(fd: int, seals: int) -> None:
    """fcntl(F_ADD_SEALS), tried again while the kernel answers EBUSY; the last EBUSY
    (or any other error) is raised."""
    for attempt in Retrying(retry=retry_if_exception(_busy),
                            stop=stop_after_attempt(SEAL_ATTEMPTS),
                            wait=wait_exponential(multiplier=0.01, max=0.25),
                            reraise=True):
        with attempt:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)


# madvise advice Python 3.11's mmap module does not name (Linux >= 5.14): fault in every
# page of a range, for writing or for reading, in one call.
MADV_POPULATE_READ: int = getattr(mmap, "MADV_POPULATE_READ", 22)
MADV_POPULATE_WRITE: int = getattr(mmap, "MADV_POPULATE_WRITE", 23)

_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int


def populate(mapping: mmap.mmap, advice: int) -> None:
    """madvise(advice) over the whole of `mapping`, with the GIL released.

    mmap.madvise holds the GIL for the whole call, and populating a gigabyte takes
    about a second, in which no other thread of the process runs (an agent's event loop
    among them); a ctypes call releases it. OSError as madvise set it."""
    if len(mapping) == 0:
        return
    if _madvise(mapping_address(mapping), len(mapping), advice) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"madvise({advice}): {os.strerror(code)}")


def mapping_address(mapping: mmap.mmap) -> int:
    """Where a mapping starts, read-only ones included (ctypes' from_buffer takes only
    writable buffers); no export of it outlives this call."""
    import numpy as np  # here: core's other users (the client) need no numpy

    return int(np.frombuffer(mapping, dtype=np.uint8).ctypes.data)
