"""`thaw bench loaders`: one model's weights restored by thaw's snapshot path and by the
loaders a user would pick instead, each from a cold and a warm page cache, in one run.

The weights are GPT-2-medium-shaped float32 tensors from a fixed seed (loader_peers.py),
written once per run into each peer's format in a temporary folder and stored as a thaw
snapshot arena: tensors laid out at the snapshot's 4 KiB alignment, stored as chunks on
the blobstore disk tier. thaw's side is the path of a host arena (where CPU weights
live) to an instance: the node fills a sealed memfd from the chunks (restore_arena), the
instance maps it copy-on-write and views its tensors with no copy. Cold fills from the
disk tier with the chunk files dropped from the page cache, warm from the pinned host
tier; "held" is every restore after a node's first, which finds the memfd already made
and only maps it (its ratio is to the peers' warm figure).

"Loaded" is the same for everyone: every page of every tensor is read inside the timing
(loader_peers.touch), so a lazy file mapping pays for its page faults and disk reads, and
every loader's bytes are checked against the weights written. Cold means the loader's
files were dropped from the page cache (posix_fadvise DONTNEED after fsync; their
residency just before is reported, from mincore). A loader that is not installed or
fails on this machine is reported as skipped with the reason.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thaw.bench.loader_peers import (
    PAGE,
    PEERS,
    Loaded,
    Peer,
    Tensors,
    installed_version,
    make_weights,
    touch,
    write_formats,
)
from thaw.blobstore import ChunkRef, DiskTier, PinnedTier, restore_arena, store_arena
from thaw.blobstore.bounded import resolve_workers
from thaw.core.errors import InvalidArgument, ThawError
from thaw.platform.memfds import SealedMemfd
from thaw.snapshotter.runtime.snapshot import align_up

GOAL = 2.0
THAW = "thaw_snapshot"
MODES = ("cold", "warm")
# thaw's own modes: the peers' two plus a restore that finds its memfd held.
THAW_MODES = ("cold", "warm", "held")


@dataclass(frozen=True)
class _Placed:
    name: str
    shape: tuple[int, ...]
    offset: int
    count: int


@dataclass
class _Snapshot:
    """The weights as a thaw snapshot arena: its chunks on `disk`, its tensors' places."""

    disk: DiskTier
    refs: list[ChunkRef]
    layout: list[_Placed]
    size: int


def run_loaders_bench(size_bytes: int, rounds: int = 2, workers: int | None = None, *,
                      only: list[str] | None = None,
                      folder: str | None = None) -> dict[str, Any]:
    """Time thaw and each peer loader, cold and warm; returns the JSON object of
    `thaw bench loaders`. Times are the best of `rounds`; GB/s are 1e9 bytes per second."""
    if not isinstance(size_bytes, int) or size_bytes < 1:
        raise InvalidArgument(f"size must be a positive number of bytes, got {size_bytes!r}",
                              field="size")
    if rounds < 1:
        raise InvalidArgument(f"rounds must be >= 1, got {rounds!r}", field="rounds")
    known = {peer.name for peer in PEERS}
    unknown = sorted(set(only or []) - known)
    if unknown:
        raise InvalidArgument(f"unknown loader(s) {unknown}; known: {sorted(known)}",
                              field="loaders")
    threads = resolve_workers(workers)
    load_before = os.getloadavg()
    peers = [peer for peer in PEERS if not only or peer.name in only]
    results: dict[str, dict[str, Any]] = {}
    runnable: list[Peer] = []
    for peer in peers:
        version = installed_version(peer.package)
        if version is None:
            results[peer.name] = {"skipped": f"{peer.package} is not installed "
                                             f"(pip install 'thaw[bench]')"}
        else:
            results[peer.name] = {"version": version}
            runnable.append(peer)

    with tempfile.TemporaryDirectory(prefix="thaw-bench-loaders-", dir=folder) as tmp:
        scratch = Path(tmp)
        weights = make_weights(size_bytes)
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        expected = touch(weights)
        paths: dict[str, Path] = {}
        for fmt in sorted({peer.fmt for peer in runnable}):
            try:
                paths.update(write_formats(weights, scratch, {fmt}))
            except Exception as exc:  # a peer's writer failing skips that peer only
                for peer in runnable:
                    if peer.fmt == fmt:
                        results[peer.name] = {"skipped": f"writing {fmt} failed: {exc!r}"}
        runnable = [peer for peer in runnable if peer.fmt in paths]
        snapshot = _store_snapshot(weights, scratch, threads)
        del weights
        gc.collect()

        samples: dict[str, dict[str, list[float]]] = {}
        stages: dict[str, list[dict[str, float]]] = {mode: [] for mode in THAW_MODES}
        held: list[SealedMemfd] = []
        residency: dict[str, dict[str, list[float]]] = {}
        for _ in range(rounds):
            for mode in THAW_MODES:
                seconds, staged = _time_thaw(snapshot, mode, threads, expected, held)
                samples.setdefault(THAW, {}).setdefault(mode, []).append(seconds)
                stages[mode].append(staged)
            for peer in list(runnable):
                try:
                    for mode in MODES:
                        seconds, resident = _time_peer(peer, paths[peer.fmt], mode, expected)
                        samples.setdefault(peer.name, {}).setdefault(mode, []).append(seconds)
                        residency.setdefault(peer.name, {}).setdefault(mode, []).append(resident)
                except Exception as exc:
                    results[peer.name] = {"version": results[peer.name].get("version"),
                                          "skipped": f"failed on this machine: {exc!r}"}
                    samples.pop(peer.name, None)
                    runnable.remove(peer)
                gc.collect()
        for memfd in held:
            memfd.close()

    results[THAW] = {"version": "this tree", "workers": threads}
    for name, by_mode in samples.items():
        for mode, times in by_mode.items():
            best = max(round(min(times), 4), 1e-4)  # the figure printed, and its rate
            results[name][mode] = {"seconds": best,
                                   "gbps": round(nbytes / best / 1e9, 3),
                                   "samples_s": [round(t, 4) for t in times]}
            if name in residency:
                results[name][mode]["resident_before"] = [
                    round(r, 3) for r in residency[name][mode]]
    for mode in THAW_MODES:
        results[THAW][mode]["stages_s"] = min(stages[mode], key=lambda s: sum(s.values()))
    report: dict[str, Any] = {"bytes": nbytes, "tensors": len(snapshot.layout),
                              "rounds": rounds, "loaders": results}
    best_peer: dict[str, str | None] = {}
    ratios: dict[str, float | None] = {}
    for mode in THAW_MODES:
        peer_mode = "warm" if mode == "held" else mode
        timed = [(results[p.name][peer_mode]["seconds"], p.name) for p in runnable]
        if timed:
            peer_s, peer_name = min(timed)
            best_peer[mode] = peer_name
            ratios[mode] = round(peer_s / results[THAW][mode]["seconds"], 3)
        else:
            best_peer[mode] = None
            ratios[mode] = None
    report.update({
        "best_peer": best_peer,
        "ratio_to_best_peer": ratios,
        "goal": GOAL,
        "goal_met": {mode: ratio is not None and ratio >= GOAL
                     for mode, ratio in ratios.items()},
        "cores": os.cpu_count(),
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
    })
    return report


def _store_snapshot(weights: Tensors, scratch: Path, threads: int) -> _Snapshot:
    """Lay the tensors out as a snapshot arena (4 KiB aligned), store it on a disk tier."""
    layout: list[_Placed] = []
    end = 0
    for name, tensor in weights.items():
        offset = align_up(end)
        layout.append(_Placed(name, tuple(tensor.shape), offset, tensor.numel()))
        end = offset + tensor.numel() * tensor.element_size()
    size = align_up(end)
    arena = scratch / "arena.bin"
    with open(arena, "wb+") as out:
        out.truncate(size)
        for placed in layout:
            data = weights[placed.name].contiguous().numpy().view("uint8").reshape(-1)
            os.pwrite(out.fileno(), memoryview(data), placed.offset)
        out.flush()
        with mmap.mmap(out.fileno(), size, access=mmap.ACCESS_READ) as mapped:
            disk = DiskTier(scratch / "chunks")
            refs = store_arena(disk, mapped, workers=threads)
    arena.unlink()
    for chunk in _chunk_files(disk):
        _fsync(chunk)
    return _Snapshot(disk, refs, layout, size)


def _chunk_files(disk: DiskTier) -> list[Path]:
    return [path for path in disk.root.rglob("*") if path.is_file()]


def _time_thaw(snapshot: _Snapshot, mode: str, threads: int, expected: int,
               held: list[SealedMemfd]) -> tuple[float, dict[str, float]]:
    """One restore of the arena as a node does it for an instance: the agent fills a
    sealed memfd from the snapshot's chunks (cold: from the disk tier with its files out
    of the page cache; warm: from the pinned tier), the instance maps it copy-on-write
    and views its tensors; then the touch. Mode "held": the memfd the node keeps after
    its first restore (every later restore only maps it). The memfd made by "warm" is
    left in `held` for the "held" round that follows."""
    import torch

    pinned: PinnedTier | None = None
    if mode == "warm":
        pinned = PinnedTier(snapshot.size)
        pinned.prewarm(snapshot.refs, snapshot.disk, workers=threads)
    elif mode == "cold":
        drop_from_cache(_chunk_files(snapshot.disk))
    resident = resident_fraction(_chunk_files(snapshot.disk))
    try:
        started = time.perf_counter()
        if mode == "held":
            memfd = held.pop()
        else:
            def fill(view: memoryview) -> None:
                restore_arena(snapshot.refs, view, disk=snapshot.disk, pinned=pinned,
                              workers=threads)

            memfd = SealedMemfd(f"thaw-bench-arena-{mode}", snapshot.size, fill)
        filled = time.perf_counter()
        # As the instance's runtime maps a host arena (restore.map_arena): private,
        # copy-on-write, nothing copied.
        mapping = mmap.mmap(memfd.fd, snapshot.size, access=mmap.ACCESS_COPY)
        tensors = {p.name: torch.frombuffer(mapping, dtype=torch.float32, count=p.count,
                                            offset=p.offset).view(p.shape)
                   for p in snapshot.layout}
        checksum = touch(tensors)
        done = time.perf_counter()
        del tensors
        mapping.close()
        if mode == "warm":
            held.append(memfd)
        else:
            memfd.close()
        _check(THAW, checksum, expected)
    finally:
        if pinned is not None:
            pinned.evict(pinned.digests())
    return done - started, {"fill_memfd_s": round(filled - started, 4),
                            "map_views_touch_s": round(done - filled, 4),
                            "disk_resident_before": round(resident, 3)}


def _time_peer(peer: Peer, path: Path, mode: str, expected: int) -> tuple[float, float]:
    """One load plus the touch; returns seconds and the file's page-cache residency
    just before."""
    if mode == "cold":
        drop_from_cache([path])
    else:
        _read_through(path)
    resident = resident_fraction([path])
    started = time.perf_counter()
    loaded: Loaded = peer.load(path)
    tensors, release = loaded
    checksum = touch(tensors)
    elapsed = time.perf_counter() - started
    del tensors, loaded
    release()
    _check(peer.name, checksum, expected)
    return elapsed, resident


def _read_through(path: Path) -> None:
    """Bring a file into the page cache without holding it in memory."""
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(16 << 20)
        while handle.readinto(buffer):
            pass


def _check(name: str, checksum: int, expected: int) -> None:
    if checksum != expected:
        raise ThawError(f"{name} produced different bytes than the weights written "
                        f"(page checksum {checksum} != {expected})")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_from_cache(paths: list[Path]) -> None:
    """Ask the kernel to drop the files' clean pages from the page cache (they were
    fsynced after writing), so the next read comes from the device."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc: Any = None


def resident_fraction(paths: list[Path]) -> float:
    """The share of the files' pages in the page cache now (mincore over a private,
    never-touched mapping of each)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if not size:
            continue
        pages = -(-size // PAGE)
        with open(path, "rb") as handle:
            mapping = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)
        try:
            anchor = ctypes.c_char.from_buffer(mapping)
            vector = (ctypes.c_ubyte * pages)()
            rc = _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)),
                               ctypes.c_size_t(size), vector)
            del anchor
            if rc != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
            resident += sum(byte & 1 for byte in vector)
            total += pages
        finally:
            mapping.close()
    return resident / total if total else 0.0
