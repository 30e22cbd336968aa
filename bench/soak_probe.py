"""Heap figures from inside the platform's service processes, for `thaw bench soak`.

RSS alone cannot tell a leak from a heap that filled once and is reused: freed memory
stays in the process (glibc keeps it in its arenas, pymalloc in its pools). So the soak
also asks each service what its heap holds, by a signal: a service started with
PROBE_ENV set (a folder) answers SIGNAL by collecting garbage and writing, to
`<folder>/<pid>-<n>.json` (n: 1 for its first answer, 2 for the next...), the objects
the collector tracks (in all and by type), pymalloc's allocated blocks, the bytes glibc's
malloc has handed out and not had back, the modules imported, and, when TRACE_ENV asks
tracemalloc to trace, the traced bytes (and a snapshot beside the JSON, for `tracemalloc`
diffs by traceback).

The services load this module from a `sitecustomize` the soak puts on their PYTHONPATH
(`sitecustomize_source`): the platform's code is not changed for the bench. The module
imports only the standard library, and only the platform's services install it: the
variables are taken out of the service's environment at once, so what the service
starts (instances, templates, builds) runs without them.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType

PROBE_ENV = "THAW_SOAK_PROBE"
"""The folder the answers go to; the probe is installed only when it is set."""
TRACE_ENV = "THAW_SOAK_TRACEMALLOC"
"""Frames per traceback for tracemalloc (tracing slows a service: investigations only)."""
SAVED_PYTHONPATH_ENV = "THAW_SOAK_PYTHONPATH"
"""The PYTHONPATH the service would have had without the probe's folder ("" for none)."""
SIGNAL = signal.SIGUSR2
SERVICES = frozenset({"gateway", "scheduler", "agent"})
"""The `thaw.ops` commands that are the platform's long-running services."""


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def malloc_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not had back, in every arena (small
    blocks and mmapped large ones); None where there is no mallinfo2 (glibc < 2.33,
    musl, other systems)."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def heap_figures() -> dict[str, object]:
    """What the heap holds once the collector has run: the figures a leak makes grow."""
    gc.collect()
    objects = gc.get_objects()
    by_type = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)
    figures: dict[str, object] = {
        "gc_objects": len(objects), "allocated_blocks": sys.getallocatedblocks(),
        "malloc_in_use_bytes": malloc_in_use(), "types": dict(by_type),
        "modules": sorted(sys.modules)}
    del objects
    if tracemalloc.is_tracing():
        figures["traced_bytes"] = tracemalloc.get_traced_memory()[0]
    return figures


class _Answerer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        stem = self.folder / f"{os.getpid()}-{self.count}"
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(f"{stem}.tm")
        part = stem.with_suffix(".part")
        part.write_text(json.dumps(heap_figures()))
        part.rename(stem.with_suffix(".json"))  # whole, or not there yet


def install() -> bool:
    """Take the probe's variables out of this process's environment and, in a platform
    service started with PROBE_ENV, answer SIGNAL; whether it was installed."""
    folder = os.environ.pop(PROBE_ENV, None)
    trace = os.environ.pop(TRACE_ENV, None)
    saved = os.environ.pop(SAVED_PYTHONPATH_ENV, None)
    if saved is not None:
        if saved:
            os.environ["PYTHONPATH"] = saved
        else:
            os.environ.pop("PYTHONPATH", None)
    argv = sys.orig_argv
    if (folder is None or argv[1:3] != ["-m", "thaw.ops"] or len(argv) < 4
            or argv[3] not in SERVICES):
        return False
    if trace:
        tracemalloc.start(int(trace))
    signal.signal(SIGNAL, _Answerer(Path(folder)))
    return True


def sitecustomize_source() -> str:
    """A `sitecustomize` module that installs the probe when PROBE_ENV is set."""
    return (f"import os\nif os.environ.get({PROBE_ENV!r}):\n"
            "    from thaw.bench.soak_probe import install\n    install()\n")
