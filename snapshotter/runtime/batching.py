"""Request batching for handlers that declare it in thaw.toml ([batching]
max_batch_size, max_batch_wait_ms): concurrent calls reach the handler as one list,
and each caller gets its own element of the list the handler returns.

Configured by the agent through the environment (THAW_MAX_BATCH_SIZE,
THAW_MAX_BATCH_WAIT_MS) so that a template's forked instances inherit it. The
collecting thread starts on the first call, after any fork (a thread must never be
running in a template when it forks).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

BATCH_SIZE_ENV = "THAW_MAX_BATCH_SIZE"
BATCH_WAIT_ENV = "THAW_MAX_BATCH_WAIT_MS"


class BatchError(RuntimeError):
    """The handler broke the batching contract (did not return one result per input)."""


class _Pending:
    __slots__ = ("value", "done", "result", "error")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Batcher:
    def __init__(self, call: Callable[[list[Any]], Any], max_size: int,
                 max_wait_s: float) -> None:
        self._call = call
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_env(cls, call: Callable[[list[Any]], Any]) -> Batcher | None:
        size = int(os.environ.get(BATCH_SIZE_ENV, "1") or 1)
        if size <= 1:
            return None
        wait_ms = float(os.environ.get(BATCH_WAIT_ENV, "0") or 0)
        return cls(call, size, wait_ms / 1000.0)

    def submit(self, value: Any) -> Any:
        """Blocks until the batch holding `value` has run; returns its own result."""
        self._ensure_thread()
        pending = _Pending(value)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="thaw-batcher",
                                                    daemon=True)
                    self._thread.start()

    def _collect(self) -> list[_Pending]:
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0
                             else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            try:
                results = self._call([p.value for p in batch])
                if not isinstance(results, (list, tuple)) or len(results) != len(batch):
                    raise BatchError(
                        f"a batched handler must return a list of {len(batch)} results "
                        f"(one per input), got {type(results).__name__}"
                        + (f" of {len(results)}" if isinstance(results, (list, tuple)) else ""))
            except BaseException as exc:  # every caller of the batch gets the error
                for pending in batch:
                    pending.error = exc
                    pending.done.set()
                continue
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
                pending.done.set()
