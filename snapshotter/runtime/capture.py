"""Capturing a handler object after setup(): the build side of a snapshot.

The object graph is pickled (protocol 5) with its bulk data taken out of the pickle and
laid out in arenas, so a restore can map it instead of copying it:
- torch storages go through `Pickler.persistent_id`, as `torch.save` does, keyed by the
  storage itself so tensors sharing a storage (views, several tensors on one buffer)
  still share it after restore;
- NumPy arrays go out of band through protocol 5's `buffer_callback`;
- large bytes/bytearray, which pickle never sends out of band, are turned into an
  out-of-band PickleBuffer by their persistent id.

torch and NumPy are never imported here: if the function did not import them, its state
cannot contain their objects.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import io
import pickle
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import secretenv
from .events import describe_exception
from .gpuinfo import capability_text, nvml_gpu_facts, read_proc_driver
from .signature import handler_schema
from .snapshot import (
    BYTEARRAY_TAG,
    BYTES_TAG,
    DEVICE_ARENA_FILE,
    HOST_ARENA_FILE,
    PICKLE_FILE,
    SNAPSHOT_FILE,
    STORAGE_TAG,
    Arena,
    Fingerprint,
    SnapshotMeta,
    StorageEntry,
    StorageKind,
    align_up,
)

PICKLE_PROTOCOL = 5

# Buffers smaller than this stay inside the pickle: each arena entry costs up to a page
# of alignment padding, and a tiny array is cheaper to copy than to map.
OUT_OF_BAND_MIN_BYTES = 64 * 1024

# The name the handler object has in attribute paths ("self.client._sock").
ROOT_NAME = "self"


class CaptureError(Exception):
    """The handler's state cannot be snapshotted; `attribute_path` says which part."""

    def __init__(self, reason: str, attribute_path: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attribute_path = attribute_path


class _ArenaLayout:
    """Assigns each storage and buffer its aligned place in an arena, keeping a
    reference to its memory until the arenas are written."""

    def __init__(self) -> None:
        self.entries: list[StorageEntry] = []
        self.sources: list[Any] = []
        self.ends = {Arena.HOST: 0, Arena.DEVICE: 0}

    def add(self, kind: StorageKind, arena: Arena, nbytes: int, dtype: str, device: str,
            source: Any) -> int:
        index = len(self.entries)
        offset = align_up(self.ends[arena])
        self.ends[arena] = offset + nbytes
        self.entries.append(StorageEntry(index, arena, offset, nbytes, kind, dtype, device))
        self.sources.append(source)
        return index

    def add_buffer(self, buffer: pickle.PickleBuffer) -> bool:
        """The pickler's buffer_callback: a false return sends the buffer out of band."""
        nbytes = buffer.raw().nbytes
        if nbytes < OUT_OF_BAND_MIN_BYTES:
            return True
        self.add(StorageKind.BUFFER, Arena.HOST, nbytes, "uint8", "cpu", buffer)
        return False

    def size(self, arena: Arena) -> int:
        return align_up(self.ends[arena])


def _drop_buffer(buffer: pickle.PickleBuffer) -> bool:
    return False


class _NullSink:
    """A file that discards what it is given (for probe pickling)."""

    def write(self, data: bytes) -> int:
        return len(data)


class _ArenaPickler(pickle.Pickler):
    """The snapshot pickler. Without a layout it is a probe: the same decisions, nothing
    kept, used to find the part of a graph that fails."""

    def __init__(self, file: Any, layout: _ArenaLayout | None) -> None:
        callback = layout.add_buffer if layout is not None else _drop_buffer
        super().__init__(file, protocol=PICKLE_PROTOCOL, buffer_callback=callback)
        self._layout = layout
        self._torch: Any = sys.modules.get("torch")
        self._storage_types: tuple[type, ...] = ()
        if self._torch is not None:
            self._storage_types = (self._torch.storage.TypedStorage, self._torch.UntypedStorage)
        self._storage_indices: dict[int, int] = {}
        # Keyed by id(): the bytes objects stay alive in the graph while we pickle.
        self._bytes_pids: dict[int, tuple[str, pickle.PickleBuffer]] = {}

    def persistent_id(self, obj: Any) -> Any:
        cls = type(obj)
        if cls is bytes or cls is bytearray:
            if len(obj) < OUT_OF_BAND_MIN_BYTES:
                return None
            pid = self._bytes_pids.get(id(obj))
            if pid is None:
                # Returning the same tuple for the same object lets pickle's memo
                # dedupe it, so the buffer is stored once.
                pid = (BYTES_TAG if cls is bytes else BYTEARRAY_TAG, pickle.PickleBuffer(obj))
                self._bytes_pids[id(obj)] = pid
            return pid
        if self._storage_types and isinstance(obj, self._storage_types):
            return self._storage_pid(obj)
        return None

    def _storage_pid(self, obj: Any) -> tuple[str, int, Any]:
        torch = self._torch
        if isinstance(obj, torch.storage.TypedStorage):
            untyped, dtype = obj._untyped_storage, obj.dtype
        else:
            untyped, dtype = obj, torch.uint8
        device = untyped.device
        if device.type not in ("cpu", "cuda"):
            raise pickle.PicklingError(f"cannot snapshot a tensor on device {device}")
        # _cdata identifies the storage itself, whichever Python wrapper we were given.
        index = self._storage_indices.get(untyped._cdata)
        if index is None:
            index = 0
            if self._layout is not None:
                index = self._layout.add(
                    StorageKind.TORCH,
                    Arena.HOST if device.type == "cpu" else Arena.DEVICE,
                    untyped.nbytes(),
                    str(dtype).removeprefix("torch."),
                    str(device),
                    untyped,
                )
            self._storage_indices[untyped._cdata] = index
        # The dtype travels with each reference, not with the storage: tensors viewing
        # one storage as different dtypes restore onto the same memory.
        return (STORAGE_TAG, index, dtype)


def _probe(obj: Any) -> Exception | None:
    try:
        _ArenaPickler(_NullSink(), None).dump(obj)
    except Exception as exc:
        return exc
    return None


# Containers we look inside even though their type comes from the standard library.
_CONTAINERS = (dict, list, tuple, collections.deque, types.SimpleNamespace)


def _is_stdlib_object(obj: Any) -> bool:
    module = getattr(type(obj), "__module__", None) or "builtins"
    return module.partition(".")[0] in sys.stdlib_module_names


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    """What pickle would recurse into, each with its attribute-path suffix.

    Objects of standard-library types (sockets, threads, locks, files, generators) are
    leaves: "self.worker" is the useful answer for a thread, not the lock inside it.
    """
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            yield f"[{key!r}]", value
        return
    if isinstance(obj, (list, tuple, collections.deque)):
        for i, value in enumerate(obj):
            yield f"[{i}]", value
        return
    if not isinstance(obj, _CONTAINERS) and _is_stdlib_object(obj):
        return
    try:
        reduced = obj.__reduce_ex__(PICKLE_PROTOCOL)
    except Exception:
        return
    if not isinstance(reduced, tuple) or len(reduced) < 3:
        return
    state = reduced[2]
    slots: Any = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slots = state
    for attributes in (state, slots):
        if isinstance(attributes, dict):
            yield from _attribute_children(obj, attributes)
    if len(reduced) > 3 and reduced[3] is not None:
        for i, value in enumerate(reduced[3]):
            yield f"[{i}]", value
    if len(reduced) > 4 and reduced[4] is not None:
        for key, value in reduced[4]:
            yield f"[{key!r}]", value


# An nn.Module keeps submodules, parameters and buffers in these dicts, but users name
# them as attributes: "self.model.encoder", not "self.model._modules['encoder']".
_MODULE_MEMBER_DICTS = ("_modules", "_parameters", "_buffers")


def _attribute_children(obj: Any, attributes: dict[Any, Any]) -> Iterator[tuple[str, Any]]:
    torch: Any = sys.modules.get("torch")
    is_module = torch is not None and isinstance(obj, torch.nn.Module)
    for name, value in list(attributes.items()):
        if is_module and name in _MODULE_MEMBER_DICTS and isinstance(value, dict):
            for member, member_value in value.items():
                yield f".{member}", member_value
        else:
            yield f".{name}", value


@dataclasses.dataclass(frozen=True)
class Culprit:
    """The innermost part of a graph that does not pickle."""

    path: str
    obj: Any
    error: Exception

    @property
    def reason(self) -> str:
        """`<ExcType>: <message>`. For an object that pickle could reduce but whose
        insides failed (a Thread's lambda target), name the object's type first: that
        is what the tenant put in their state."""
        try:
            self.obj.__reduce_ex__(PICKLE_PROTOCOL)
        except Exception:
            return describe_exception(self.error)
        if isinstance(self.obj, _CONTAINERS) or not _is_stdlib_object(self.obj):
            return describe_exception(self.error)
        name = type(self.obj).__qualname__
        return f"TypeError: cannot pickle {name!r} object ({describe_exception(self.error)})"


def find_failing_path(
    root: Any, probe: Callable[[Any], Exception | None] = _probe
) -> Culprit | None:
    """Descend from `root` into the first child that fails to pickle, until none of the
    current object's children fails: that object is the innermost culprit."""
    error = probe(root)
    if error is None:
        return None
    path, obj, on_path = ROOT_NAME, root, {id(root)}
    while True:
        for suffix, child in _children(obj):
            if id(child) in on_path:
                continue
            child_error = probe(child)
            if child_error is not None:
                path, obj, error = path + suffix, child, child_error
                on_path.add(id(child))
                break
        else:
            return Culprit(path, obj, error)


def _storage_memory(source: Any) -> tuple[Any, Any]:
    """A buffer over an arena entry's bytes, plus whatever must stay alive meanwhile."""
    if isinstance(source, pickle.PickleBuffer):
        return source.raw(), source
    storage = source if source.device.type == "cpu" else source.cpu()
    # ctypes rather than storage.numpy(): torch may be installed without NumPy.
    view = (ctypes.c_char * storage.nbytes()).from_address(storage.data_ptr())
    return view, storage


def _write_arena(path: Path, layout: _ArenaLayout, arena: Arena) -> int:
    size = layout.size(arena)
    # No fsync: the agent reads the build's output right away and its blobstore makes
    # the chunks durable.
    with open(path, "wb") as f:
        for entry, source in zip(layout.entries, layout.sources, strict=True):
            if entry.arena is not arena or entry.nbytes == 0:
                continue
            memory, keepalive = _storage_memory(source)
            f.seek(entry.offset)
            f.write(memory)
            del memory, keepalive
        f.truncate(size)
    return size


def _nvidia_driver_version() -> str | None:
    """The kernel driver's version ("570.86.15"), from /proc or else NVML; None without
    an NVIDIA driver. gpuinfo parses both module flavours (proprietary and open)."""
    kernel = read_proc_driver()
    if kernel is not None:
        return kernel.version
    return nvml_gpu_facts().driver or None


def _compute_capability(torch: Any) -> str | None:
    """The capturing GPU's compute capability ("9.0"): its major number is the
    architecture family a restore must match (snapshotter/manifest.py)."""
    return capability_text(torch.cuda.get_device_capability()) or None


def _fingerprint(uses_device: bool, function_version: str | None) -> Fingerprint:
    torch: Any = sys.modules.get("torch")
    numpy: Any = sys.modules.get("numpy")
    gpu_model = compute_capability = None
    if uses_device:
        gpu_model = str(torch.cuda.get_device_name())
        compute_capability = _compute_capability(torch)
    values: dict[str, str | None] = {
        "python": ".".join(map(str, sys.version_info[:3])),
        "torch": str(torch.__version__) if torch is not None else None,
        "numpy": str(numpy.__version__) if numpy is not None else None,
        "device_type": "cuda" if uses_device else "host",
        "gpu_model": gpu_model,
        "driver": _nvidia_driver_version() if uses_device else None,
        "compute_capability": compute_capability,
        "function_version": function_version,
    }
    # Only what snapshot.json's schema (snapshot.Fingerprint) holds: a field it does
    # not know yet would make the file unreadable to the restoring runtime.
    known = {f.name for f in dataclasses.fields(Fingerprint)}
    return Fingerprint(**{k: v for k, v in values.items() if k in known})  # type: ignore[arg-type]


def pickle_handler(handler: object) -> tuple[bytes, _ArenaLayout]:
    """Pickle with arena references; raises CaptureError naming the failing path."""
    layout = _ArenaLayout()
    data = io.BytesIO()
    try:
        _ArenaPickler(data, layout).dump(handler)
    except Exception as exc:
        culprit = find_failing_path(handler)
        if culprit is None:  # only the whole failed (e.g. too deep): report that
            raise CaptureError(describe_exception(exc), None) from exc
        raise CaptureError(culprit.reason, culprit.path) from exc
    return data.getvalue(), layout


def capture(
    handler: object,
    out_dir: Path,
    *,
    modules: list[str],
    timings: dict[str, float],
    function_version: str | None = None,
    clock: Callable[[], float] | None = None,
) -> SnapshotMeta:
    """Write state.pickle, host.arena, device.arena and (last) snapshot.json.

    `timings` gets a "capture" entry (pickling and arena writes) before snapshot.json is
    written."""
    now = clock or time.perf_counter
    started = now()
    # Values in the environment stay out of what is pickled (os.environ itself, if
    # the handler holds it); restores get the current ones (secretenv.py).
    secretenv.forget()
    out_dir.mkdir(parents=True, exist_ok=True)
    # An older build's snapshot.json must not vouch for files this one rewrites.
    (out_dir / SNAPSHOT_FILE).unlink(missing_ok=True)
    data, layout = pickle_handler(handler)
    (out_dir / PICKLE_FILE).write_bytes(data)
    host_size = _write_arena(out_dir / HOST_ARENA_FILE, layout, Arena.HOST)
    device_size = _write_arena(out_dir / DEVICE_ARENA_FILE, layout, Arena.DEVICE)
    uses_device = any(entry.arena is Arena.DEVICE for entry in layout.entries)
    timings["capture"] = now() - started
    meta = SnapshotMeta(
        storages=tuple(layout.entries),
        # Once each, in first-import order: a build forked from a template lists the
        # template's modules and then those setup() imported, which may repeat one.
        modules=tuple(dict.fromkeys(modules)),
        fingerprint=_fingerprint(uses_device, function_version),
        timings=dict(timings),
        host_size=host_size,
        device_size=device_size,
        input_schema=handler_schema(handler),
    )
    meta.dump(out_dir / SNAPSHOT_FILE)
    return meta
