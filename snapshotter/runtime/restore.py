"""Rebuilding a handler object from a snapshot: the restore side of capture.py.

The agent hands the snapshot over as descriptors (sealed memfds): the host arena is
mapped copy-on-write (MAP_PRIVATE), so nothing is copied, every instance of one snapshot
shares the same pages, and a tensor the handler writes to gets private pages of its own.
torch storages become zero-copy views over the mapping, and NumPy arrays are handed
views of it through pickle's `buffers=`.

Device storages are views into the instance's slice, which the agent filled with the
snapshot's device arena before the restore: on the host backend the slice is a memfd
mapped shared (its pages are the instance's "device memory"), on cuda a CUDA IPC
allocation opened with `device_slice.open_slice` and viewed through DLPack. Nothing is
copied to the device here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import gc
import importlib
import io
import mmap
import os
import pickle
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import secretenv
from .events import SliceDescriptor, SpawnRequest, close_fds
from .snapshot import (
    BYTEARRAY_TAG,
    BYTES_TAG,
    STORAGE_TAG,
    Arena,
    SnapshotMeta,
    StorageEntry,
    StorageKind,
    read_descriptor,
)

ArenaSource = int | str | os.PathLike[str] | None
"""An arena by descriptor (what the agent sends), or by path (a caller restoring files
by hand, tests)."""

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


def map_arena(source: ArenaSource, size: int, name: str) -> mmap.mmap | None:
    """The arena mapped copy-on-write; a descriptor stays open (the caller's to close:
    the mapping outlives it)."""
    if size == 0:
        return None
    if source is None:
        raise RestoreError(f"snapshot has a {size}-byte {name} arena but none was given")
    if isinstance(source, int):
        return _map_copy(source, size, f"{name} arena (descriptor {source})")
    with open(source, "rb") as f:
        return _map_copy(f.fileno(), size, f"{name} arena {source}")


def _map_copy(fd: int, size: int, what: str) -> mmap.mmap:
    found = os.fstat(fd).st_size
    # A short file would map fine and then SIGBUS on first touch of the missing tail.
    if found < size:
        raise RestoreError(f"{what} is {found} bytes, snapshot needs {size}")
    mapping = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    _mappings.append(mapping)
    return mapping


# Linux >= 5.14: fault a range's pages in, readable, without writing to them (so a
# copy-on-write mapping stays shared). Python 3.11's mmap module lacks the constant.
MADV_POPULATE_READ: int = getattr(mmap, "MADV_POPULATE_READ", 22)
_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int


def populate(mapping: mmap.mmap) -> bool:
    """Fault every page of `mapping` in, reading only; False where the kernel refuses
    (EINVAL: older than 5.14, or a mapping it cannot populate), which costs nothing:
    pages then fault in on first touch as before. Called through ctypes, which
    releases the GIL (mmap.madvise holds it), so unpickling runs meanwhile."""
    if len(mapping) == 0:
        return False
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        address = ctypes.addressof(anchor)
        if _madvise(address, len(mapping), MADV_POPULATE_READ) == 0:
            return True
    finally:
        del anchor  # releases the export: the mapping could not be closed otherwise
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(code, f"madvise(MADV_POPULATE_READ): {os.strerror(code)}")


class Prefault:
    """Populates a mapping on a background thread: started before unpickling, joined
    before the first call."""

    def __init__(self, mapping: mmap.mmap | None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._mapping = mapping
        self._clock = clock
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if mapping is not None and len(mapping) > 0:
            self._thread = threading.Thread(target=self._run, name="thaw-prefault",
                                            daemon=True)
            self._thread.start()

    @property
    def started(self) -> bool:
        """Whether there was anything to prefault."""
        return self._thread is not None

    def _run(self) -> None:
        assert self._mapping is not None
        try:
            populate(self._mapping)
        except BaseException as exc:  # reported on join, in the restoring thread
            self._error = exc

    def join(self) -> float:
        """Wait for it; the seconds waited (what it added to the restore beyond the
        unpickling it overlapped). A fault it met (EFAULT, ENOMEM: an arena the node
        cannot back) is raised here, as a first touch would have met it."""
        if self._thread is None:
            return 0.0
        started = self._clock()
        self._thread.join()
        waited = self._clock() - started
        if self._error is not None:
            raise RestoreError(f"prefaulting the host arena failed: {self._error}")
        return waited


def read_source(source: int | str | os.PathLike[str]) -> bytes:
    if isinstance(source, int):
        return read_descriptor(source)
    return Path(source).read_bytes()


class DeviceMemory:
    """The instance's slice, opened: device storages are views into it."""

    def __init__(self, descriptor: SliceDescriptor, slice_fd: int | None) -> None:
        self.descriptor = descriptor
        self._host: mmap.mmap | None = None
        self._cuda: Any = None
        if descriptor.kind == "host":
            if slice_fd is None:
                raise RestoreError("a host slice needs its descriptor")
            found = os.fstat(slice_fd).st_size
            if found < descriptor.size:
                raise RestoreError(f"slice is {found} bytes, its descriptor says "
                                   f"{descriptor.size}")
            # Shared: the slice is this instance's own memory, written in place.
            self._host = mmap.mmap(slice_fd, descriptor.size, access=mmap.ACCESS_WRITE)
            _mappings.append(self._host)
        else:
            from .device_slice import SliceOpenError, open_slice

            try:
                self._cuda = open_slice(descriptor.ipc_handle, descriptor.size,
                                        descriptor.device_index, descriptor.pci_bus_id)
            except SliceOpenError as exc:
                raise RestoreError(str(exc)) from exc

    def check_fits(self, arena_size: int) -> None:
        room = self.descriptor.size - self.descriptor.offset
        if arena_size > room:
            raise RestoreError(f"the snapshot's {arena_size}-byte device arena does not fit "
                               f"the slice ({room} bytes from offset "
                               f"{self.descriptor.offset})")

    def storage(self, torch: Any, entry: StorageEntry) -> Any:
        start = self.descriptor.offset + entry.offset
        if self._host is not None:
            if entry.nbytes == 0:
                return torch.UntypedStorage(0)
            return torch.frombuffer(self._host, dtype=torch.uint8, count=entry.nbytes,
                                    offset=start).untyped_storage()
        from .device_slice import SliceOpenError

        try:
            return self._cuda.storage(start, entry.nbytes)
        except SliceOpenError as exc:
            raise RestoreError(str(exc)) from exc

    def bound_allocations(self, arena_size: int) -> None:
        """What the function allocates on its GPU from now on is bounded by the rest of
        its slice: torch's caching allocator is capped at those bytes (past them an
        allocation raises torch.OutOfMemoryError, which the server answers 507 and
        exits on, like a host-memory overrun). Nothing to do on the host backend, whose
        instances' memory is capped by the agent's RLIMIT_DATA."""
        if self._cuda is None:
            return
        torch: Any = sys.modules.get("torch")
        if torch is None:
            return
        whole = self.descriptor.limit or self.descriptor.size
        room = max(0, whole - self.descriptor.offset - arena_size)
        device = int(self._cuda.device)
        total = int(torch.cuda.get_device_properties(device).total_memory)
        torch.cuda.set_per_process_memory_fraction(min(1.0, room / total), device)

    @property
    def cuda_device(self) -> int | None:
        return int(self._cuda.device) if self._cuda is not None else None


def _require_torch(meta: SnapshotMeta, device: DeviceMemory | None) -> Any:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        raise RestoreError("snapshot holds torch storages but torch is not installed") from None
    device_entries = [e for e in meta.storages if e.arena is Arena.DEVICE]
    if not device_entries:
        return torch
    nbytes = sum(e.nbytes for e in device_entries)
    on_cuda = any(e.device.startswith("cuda") for e in device_entries)
    if on_cuda and (device is None or device.descriptor.kind == "cuda") \
            and not torch.cuda.is_available():
        raise RestoreError(
            f"snapshot holds {len(device_entries)} CUDA storages ({nbytes} bytes) "
            "but torch.cuda is not available here"
        )
    if device is None:
        raise RestoreError(f"snapshot holds {len(device_entries)} device storages "
                           f"({nbytes} bytes) but the instance was given no slice")
    return torch


def _torch_storage(torch: Any, mapping: mmap.mmap | None, entry: StorageEntry) -> Any:
    if entry.nbytes == 0 or mapping is None:
        return torch.UntypedStorage(0, device=entry.device)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=entry.nbytes,
                            offset=entry.offset).untyped_storage()


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


@dataclasses.dataclass(frozen=True)
class Unpickled:
    """A snapshot's host state rebuilt, before anything of one instance's own ran
    (no reseed, no on_restore): what a restored template holds and forks."""

    handler: object
    host: mmap.mmap | None
    """The host arena's copy-on-write mapping (None for an empty arena)."""
    timings: dict[str, float]


def unpickle_snapshot(
    meta: SnapshotMeta,
    pickle_source: int | str | os.PathLike[str],
    host_arena: ArenaSource,
    clock: Callable[[], float] = time.perf_counter,
    *,
    device: DeviceMemory | None = None,
    prefault: bool = True,
) -> Unpickled:
    """Map, unpickle (the host arena prefaulted meanwhile unless `prefault` is False).
    Device storages become views into `device` (the instance's slice, already filled
    by the agent); no device storage is ever copied from host memory here. Runs no
    code of the tenant's beyond what unpickling runs, and leaves no thread behind.
    Raises RestoreError for snapshots that cannot be restored here."""
    started = clock()
    check_fingerprint(meta)
    host = map_arena(host_arena, meta.host_size, "host")
    has_torch = any(e.kind is StorageKind.TORCH for e in meta.storages)
    torch = _require_torch(meta, device) if has_torch else None
    if device is not None and meta.device_size:
        device.check_fits(meta.device_size)
    host_view = memoryview(host) if host is not None else None
    storages: dict[int, Any] = {}
    buffers: list[memoryview] = []
    for entry in meta.storages:
        if entry.kind is StorageKind.BUFFER:
            if host_view is None:
                raise RestoreError("snapshot has buffers but an empty host arena")
            buffers.append(host_view[entry.offset : entry.offset + entry.nbytes])
        elif entry.arena is Arena.HOST:
            storages[entry.index] = _torch_storage(torch, host, entry)
        else:
            assert device is not None  # _require_torch refused a device storage without
            storages[entry.index] = device.storage(torch, entry)
    mapped = clock()
    # Pages fault in on the side while the object graph is rebuilt, instead of one by
    # one during the first call.
    background = Prefault(host if prefault else None, clock)

    data = read_source(pickle_source)
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
    prefault_s = background.join()
    timings = {"map": mapped - started, "unpickle": unpickled - mapped}
    if background.started:
        timings["prefault"] = prefault_s
    return Unpickled(handler, host, timings)


def finish_restore(handler: object,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """What each instance runs of its own once the state is there: reseed its random
    generators, then the handler's on_restore(); the seconds that took. Exceptions from
    the tenant's code propagate as they are."""
    started = clock()
    reseed_generators()
    on_restore = getattr(handler, "on_restore", None)
    if callable(on_restore):
        on_restore()
    return clock() - started


def restore_handler(
    meta: SnapshotMeta,
    pickle_source: int | str | os.PathLike[str],
    host_arena: ArenaSource,
    device_arena: ArenaSource = None,
    clock: Callable[[], float] = time.perf_counter,
    *,
    device: DeviceMemory | None = None,
    prefault: bool = True,
) -> Restored:
    """Map, unpickle (the host arena prefaulted meanwhile unless `prefault` is False),
    reseed, on_restore(): `unpickle_snapshot` then `finish_restore`. `device_arena` is
    only checked for: the agent put the device arena into `device` before. Raises
    RestoreError for snapshots that cannot be restored here; exceptions from the
    tenant's code propagate as they are."""
    del device_arena  # the agent put the device arena into the slice
    state = unpickle_snapshot(meta, pickle_source, host_arena, clock, device=device,
                              prefault=prefault)
    timings = dict(state.timings)
    timings["on_restore"] = finish_restore(state.handler, clock)
    return Restored(state.handler, timings)


received: SpawnRequest | None = None
"""The spawn request this instance was restored from (its descriptors closed since): what
the agent told it, for the instance to report."""


def restore_request(request: SpawnRequest) -> Restored:
    """Restore what a spawn request hands over, then close its descriptors (the
    mappings made from them stay)."""
    global received
    received = request
    # Before the slice is opened: CUDA reads these when it initialises. The secrets
    # too, before on_restore: it sees their current values.
    secretenv.apply(request.env, request.secrets)
    try:
        meta = SnapshotMeta.load(request.fds["snapshot_json"])
        device = (DeviceMemory(request.slice, request.fd("slice"))
                  if request.slice is not None else None)
        restored = restore_handler(meta, request.fds["pickle"], request.fd("host_arena"),
                                   device=device)
        if device is not None:
            device.bound_allocations(meta.device_size)
        return restored
    finally:
        close_fds(request.fds.values())


def restore_forked(request: SpawnRequest, state: Unpickled,
                   clock: Callable[[], float] = time.perf_counter) -> Restored:
    """The part of a restore that is each instance's own, in an instance forked from a
    restored template that already holds the snapshot's host state (`state`): the
    request's env and secrets, its slice opened (such snapshots have no device arena:
    the slice only bounds what the function allocates on its GPU, through the same
    DeviceMemory as any restore), the host arena's pages faulted in (already there in
    the template: this only maps them), reseed and on_restore(). Closes the request's
    descriptors."""
    global received
    received = request
    secretenv.apply(request.env, request.secrets)
    try:
        device = (DeviceMemory(request.slice, request.fd("slice"))
                  if request.slice is not None else None)
        background = Prefault(state.host, clock)
        timings = {"prefault": background.join()} if background.started else {}
        timings["on_restore"] = finish_restore(state.handler, clock)
        if device is not None:
            device.bound_allocations(0)
        return Restored(state.handler, timings)
    finally:
        close_fds(request.fds.values())
