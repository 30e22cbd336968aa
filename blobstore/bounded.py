"""A thread pool with a bound on work in flight, for chunk I/O, hashing and copies.

hashlib, lz4, file reads and np.copyto all release the GIL, so threads give real
parallelism here; the bound keeps memory flat: a task allocates its chunk only once it
runs, and no more than `workers` tasks are submitted at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from thaw.core.errors import InvalidArgument

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """One thread per core: the copies are memory-bound and the hashing CPU-bound, so more
    threads than cores only add contention."""
    return os.cpu_count() or 1


def resolve_workers(workers: int | None) -> int:
    if workers is None:
        return default_workers()
    if not isinstance(workers, int) or workers < 1:
        raise InvalidArgument(f"workers must be an integer >= 1, got {workers!r}",
                              field="workers")
    return workers


def run_bounded(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """`[fn(item) for item in items]` on `workers` threads, at most `workers` in flight.

    The first exception is raised only after every started task has finished, so nothing
    still writes into the caller's buffers once this returns or raises; tasks not yet
    started are dropped.
    """
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    results: list[R | None] = [None] * len(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thaw-blobstore") as pool:
        in_flight: dict[Future[R], int] = {}
        try:
            for index, item in enumerate(items):
                while len(in_flight) >= workers:
                    _collect(in_flight, results)
                in_flight[pool.submit(fn, item)] = index
            while in_flight:
                _collect(in_flight, results)
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
    return results  # type: ignore[return-value]  # every slot was filled above


def _collect(in_flight: dict[Future[R], int], results: list[R | None]) -> None:
    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
    for future in done:
        results[in_flight.pop(future)] = future.result()
