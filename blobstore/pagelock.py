"""Keeping the pinned tier's pages resident: `mlock` on the host backend, page-locking
with `cudaHostRegister` on CUDA, behind one small seam (`PageLocker`) that tests replace
with a fake recording the calls.

A locker locks exact byte ranges (the tier's regions are exact sizes, rounded to a page):
no power-of-two pool sits between the tier and the kernel or the driver, so a prewarm of
N bytes locks N bytes. A lock that cannot be had is not an error: the region stays
pageable (copies from it still work, slower on CUDA, and its pages may be swapped on the
host), and the refusal's reason is what `thaw node ls` shows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import threading
from typing import Any, Protocol

from thaw.core.errors import ThawError
from thaw.core.units import format_size


class LockRefused(Exception):
    """A range could not be locked; the message says why, for operators."""


class PageLocker(Protocol):
    """Locks and unlocks exact byte ranges of the process's memory."""

    name: str
    """Shown in logs: "mlock", "cudaHostRegister"."""

    def lock(self, address: int, length: int) -> None:
        """Lock `length` bytes at `address` (page-aligned, mapped, read-only is fine).
        LockRefused if the system will not: nothing is locked then."""
        ...

    def unlock(self, address: int, length: int) -> None:
        """Undo one successful `lock` of exactly this range, before it is unmapped."""
        ...

    def refusal_for(self, capacity: int) -> str:
        """Why a tier of `capacity` bytes could not be wholly locked ("" if it can):
        a node reports this before any region exists."""
        ...


# The libc calls, resolved once. The standard library has no mlock (mmap exposes
# madvise, not mlock), and no maintained package on PyPI wraps the two calls, so they
# go through ctypes.
_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        for function in (libc.mlock, libc.munlock):
            function.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            function.restype = ctypes.c_int
        _libc = libc
    return _libc


def memlock_limit() -> int | None:
    """The soft RLIMIT_MEMLOCK in bytes; None when unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


class MlockLocker:
    """`mlock(2)` within RLIMIT_MEMLOCK, for the host backend.

    The limit is treated as the operator's budget for locked memory even where the
    process could exceed it (root with CAP_IPC_LOCK): a range that would take this
    locker's total past the soft limit is refused before mlock is called, so raising
    the limit (systemd `LimitMEMLOCK=`, `ulimit -l`) is the one switch that turns
    locking on.
    """

    name = "mlock"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locked = 0

    @property
    def locked_bytes(self) -> int:
        with self._lock:
            return self._locked

    def lock(self, address: int, length: int) -> None:
        limit = memlock_limit()
        with self._lock:
            wanted = self._locked + length
            if limit is not None and wanted > limit:
                raise LockRefused(f"RLIMIT_MEMLOCK {format_size(limit)} < "
                                  f"{format_size(wanted)}")
            if _load_libc().mlock(address, length) != 0:
                code = ctypes.get_errno()
                raise LockRefused(f"mlock of {format_size(length)}: {os.strerror(code)}")
            self._locked = wanted

    def unlock(self, address: int, length: int) -> None:
        with self._lock:
            _load_libc().munlock(address, length)
            self._locked -= length

    def refusal_for(self, capacity: int) -> str:
        limit = memlock_limit()
        if limit is not None and limit < capacity:
            return f"RLIMIT_MEMLOCK {format_size(limit)} < {format_size(capacity)}"
        return ""


# cudaHostRegister flags (CUDA runtime API, cudaHostRegisterFlags; CuPy takes them as a
# plain unsigned int). Portable: every CUDA context of the agent sees the range as
# pinned, whichever GPU a slice is on. ReadOnly: the range is mapped read-only (a
# sealed memfd cannot be mapped writable); without it the driver refuses such a range.
CUDA_HOST_REGISTER_PORTABLE = 0x01
CUDA_HOST_REGISTER_READ_ONLY = 0x08


class CudaHostRegistrar:
    """Page-locks ranges with `cudaHostRegister` (CuPy's runtime bindings), so
    host-to-device copies from them run at PCIe speed."""

    name = "cudaHostRegister"

    def __init__(self, runtime: Any = None) -> None:
        """`runtime`: an object with CuPy's `hostRegister(ptr, size, flags)` and
        `hostUnregister(ptr)` (default `cupy.cuda.runtime`; tests pass a fake)."""
        if runtime is None:  # pragma: no cover - needs CuPy
            try:
                from cupy.cuda import runtime as cupy_runtime
            except ImportError as exc:
                raise ThawError("the cuda pinned tier needs CuPy "
                                "(pip install 'thaw[cuda]')") from exc
            runtime = cupy_runtime
        self._runtime = runtime

    def lock(self, address: int, length: int) -> None:
        flags = CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_READ_ONLY
        try:
            self._runtime.hostRegister(address, length, flags)
        except Exception as exc:  # CuPy raises its CUDARuntimeError
            raise LockRefused(f"cudaHostRegister of {format_size(length)}: {exc}") from exc

    def unlock(self, address: int, length: int) -> None:
        del length
        try:
            self._runtime.hostUnregister(address)
        except Exception as exc:  # CuPy raises its CUDARuntimeError
            raise ThawError(f"cudaHostUnregister: {exc}") from exc

    def refusal_for(self, capacity: int) -> str:
        del capacity
        return ""
