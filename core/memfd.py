"""Sealing a memfd that was just written through a mapping.

F_SEAL_WRITE is refused with EBUSY while any page of the file holds an extra reference:
the kernel waits for such pins a short while and then gives up. Right after a mapping
is unmapped, pages can still sit in another CPU's LRU batch, each holding a reference
until that batch drains, which on a loaded machine can outlast the kernel's wait. The
refusal is then transient: tried again a few times it succeeds."""

from __future__ import annotations

import errno
import fcntl

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
