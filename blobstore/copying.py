"""Bulk byte copies that run in parallel across threads.

Measured on a 2-core Xeon, 1 GiB into a /dev/shm mapping, several threads each copying a
range: memoryview slice assignment holds the GIL (11.9 GB/s on 1 thread, 11.6 on 2),
while `np.copyto` and `ctypes.memmove` release it (11.8 -> 20.6 GB/s). np.copyto is used:
same speed as memmove, and it checks bounds.
"""

from __future__ import annotations

import numpy as np

from thaw.core.errors import InvalidArgument

from .chunks import BytesLike

# Split points land on page boundaries so no two threads write into one page (or one
# cache line) and each thread's range starts aligned for the kernel's copy routine.
_PAGE = 4096


def copy_bytes(dst: memoryview, src: BytesLike) -> None:
    """`dst[:] = src` with the GIL released for the copy."""
    source_size, target_size = memoryview(src).nbytes, dst.nbytes
    if source_size != target_size:
        raise InvalidArgument(f"copying {source_size} bytes into {target_size}", field="length")
    # No array outlives this statement: a live export would keep a caller's mmap from
    # closing, even from a traceback.
    np.copyto(np.frombuffer(dst, dtype=np.uint8), np.frombuffer(src, dtype=np.uint8))


def split_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """`[start, end)` ranges covering `total` bytes in about `parts` equal, page-aligned
    pieces (fewer when `total` is small); empty when `total` is 0."""
    if total <= 0:
        return []
    parts = max(1, min(parts, -(-total // _PAGE)))
    step = -(-total // parts)
    step = -(-step // _PAGE) * _PAGE
    return [(start, min(start + step, total)) for start in range(0, total, step)]
