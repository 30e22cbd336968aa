"""Rebuilding a handler object from a snapshot: the restore side of capture.py.

The host arena is mapped copy-on-write (MAP_PRIVATE): nothing is copied, every instance
of one snapshot shares the page cache's pages, and a tensor the handler writes to gets
private pages of its own. torch storages become zero-copy views over the mapping, and
NumPy arrays are handed views of it through pickle's `buffers=`.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import io
import mmap
import os
import pickle
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .snapshot import (
    BYTEARRAY_TAG,
    BYTES_TAG,
    STORAGE_TAG,
    Arena,
    SnapshotMeta,
    StorageEntry,
    StorageKind,
)

# Mappings live as long as the process: every restored tensor points into one.
_mappings: list[mmap.mmap] = []


class RestoreError(Exception):
    """This snapshot cannot be restored in this process (the reason says why)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    handler: object
    timings: dict[str, float]


def check_fingerprint(meta: SnapshotMeta) -> None:
    """Refuse a snapshot taken with other Python, torch or NumPy versions: pickled
    objects and storage layouts are only promised to round-trip within one version."""
    fingerprint = meta.fingerprint
    python = ".".join(map(str, sys.version_info[:3]))
    if fingerprint.python != python:
        raise RestoreError(f"snapshot is for Python {fingerprint.python}, this is {python}")
    for name, wanted in (("torch", fingerprint.torch), ("numpy", fingerprint.numpy)):
        if wanted is None:
            continue
        try:
            found = str(importlib.import_module(name).__version__)
        except ImportError:
            raise RestoreError(f"snapshot needs {name} {wanted}, which is not installed") from None
        if found != wanted:
            raise RestoreError(f"snapshot is for {name} {wanted}, this is {name} {found}")


def map_arena(path: str | os.PathLike[str] | None, size: int, name: str) -> mmap.mmap | None:
    if size == 0:
        return None
    if path is None:
        raise RestoreError(f"snapshot has a {size}-byte {name} arena but none was given")
    with open(path, "rb") as f:
        found = os.fstat(f.fileno()).st_size
        # A short file would map fine and then SIGBUS on first touch of the missing tail.
        if found < size:
            raise RestoreError(f"{name} arena {path} is {found} bytes, snapshot needs {size}")
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    _mappings.append(mapping)
    return mapping


def _require_torch(meta: SnapshotMeta) -> Any:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        raise RestoreError("snapshot holds torch storages but torch is not installed") from None
    device_entries = [e for e in meta.storages if e.arena is Arena.DEVICE]
    if device_entries and not torch.cuda.is_available():
        nbytes = sum(e.nbytes for e in device_entries)
        raise RestoreError(
            f"snapshot holds {len(device_entries)} CUDA storages ({nbytes} bytes) "
            "but torch.cuda is not available here"
        )
    return torch


def _torch_storage(torch: Any, mapping: mmap.mmap | None, entry: StorageEntry) -> Any:
    if entry.nbytes == 0 or mapping is None:
        return torch.UntypedStorage(0, device=entry.device)
    host = torch.frombuffer(mapping, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
    if entry.arena is Arena.DEVICE:
        # The device arena arrives as host memory here; the agent's CUDA path hands the
        # instance an IPC handle instead (DESIGN.md §6).
        return host.to(torch.device(entry.device)).untyped_storage()
    return host.untyped_storage()


class _ArenaUnpickler(pickle.Unpickler):
    """Resolves capture.py's persistent ids against the mapped arenas."""

    def __init__(self, data: bytes, storages: dict[int, Any], buffers: list[memoryview],
                 torch: Any) -> None:
        super().__init__(io.BytesIO(data), buffers=buffers)
        self._storages = storages
        self._torch = torch
        self._typed: dict[tuple[int, Any], Any] = {}
        # One pickled bytes object referenced twice arrives twice with the same
        # memoryview (pickle's memo); keep it one object. Values hold the view, so its
        # id stays unique.
        self._copies: dict[int, tuple[memoryview, bytes | bytearray]] = {}

    def persistent_load(self, pid: Any) -> Any:
        tag = pid[0]
        if tag == STORAGE_TAG:
            _, index, dtype = pid
            typed = self._typed.get((index, dtype))
            if typed is None:
                # As torch.load does: tensors are rebuilt over a TypedStorage.
                typed = self._torch.storage.TypedStorage(
                    wrap_storage=self._storages[index], dtype=dtype, _internal=True
                )
                self._typed[(index, dtype)] = typed
            return typed
        if tag in (BYTES_TAG, BYTEARRAY_TAG):
            view = pid[1]
            cached = self._copies.get(id(view))
            if cached is None:
                # bytes and bytearray own their memory, so this is the one copy a
                # restore makes; code that needs zero-copy should hold a NumPy array.
                cached = (view, bytes(view) if tag == BYTES_TAG else bytearray(view))
                self._copies[id(view)] = cached
            return cached[1]
        raise pickle.UnpicklingError(f"unknown persistent id {tag!r} in snapshot")


def reseed_generators() -> None:
    """Give this instance its own random state: every restore of a snapshot (and every
    fork of a template) would otherwise replay the same draws."""
    random.seed(os.urandom(32))
    numpy_random: Any = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy: Any = sys.modules["numpy"]
        numpy_random.seed(numpy.frombuffer(os.urandom(16), dtype=numpy.uint32))
    torch: Any = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "manual_seed"):
        # manual_seed also reseeds every CUDA device (lazily, if CUDA is initialised).
        torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def restore_handler(
    meta: SnapshotMeta,
    pickle_path: str | os.PathLike[str],
    host_arena: str | os.PathLike[str] | None,
    device_arena: str | os.PathLike[str] | None,
    clock: Callable[[], float] = time.perf_counter,
) -> Restored:
    """Map, unpickle, reseed, on_restore(). Raises RestoreError for snapshots that
    cannot be restored here; exceptions from the tenant's code propagate as they are."""
    started = clock()
    check_fingerprint(meta)
    host = map_arena(host_arena, meta.host_size, "host")
    has_torch = any(e.kind is StorageKind.TORCH for e in meta.storages)
    torch = _require_torch(meta) if has_torch else None
    device = map_arena(device_arena, meta.device_size, "device") if meta.device_size else None
    host_view = memoryview(host) if host is not None else None
    storages: dict[int, Any] = {}
    buffers: list[memoryview] = []
    for entry in meta.storages:
        if entry.kind is StorageKind.BUFFER:
            if host_view is None:
                raise RestoreError("snapshot has buffers but an empty host arena")
            buffers.append(host_view[entry.offset : entry.offset + entry.nbytes])
        else:
            storages[entry.index] = _torch_storage(
                torch, host if entry.arena is Arena.HOST else device, entry
            )
    mapped = clock()

    data = Path(pickle_path).read_bytes()
    # Unpickling allocates a whole object graph and nothing in it is garbage yet:
    # collections triggered meanwhile only cost time (and, in a forked instance, touch
    # and so copy the template's pages).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        handler = _ArenaUnpickler(data, storages, buffers, torch).load()
    finally:
        if gc_was_enabled:
            gc.enable()
    unpickled = clock()

    reseed_generators()
    on_restore = getattr(handler, "on_restore", None)
    if callable(on_restore):
        on_restore()
    finished = clock()
    timings = {
        "map": mapped - started,
        "unpickle": unpickled - mapped,
        "on_restore": finished - unpickled,
    }
    return Restored(handler, timings)
