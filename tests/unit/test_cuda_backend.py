"""The cuda device backend against the in-memory CUDA fake: packing, zeroing order,
stream splitting and errors (DESIGN.md §6). No GPU or CuPy needed; tests/gpu/ runs the
same paths on real hardware."""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import os
import struct
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from thaw.blobstore import ChunkRef, PinnedTier
from thaw.core.errors import ChunkNotFound, InvalidArgument, NotFound, OutOfMemory, ThawError
from thaw.platform.cuda import (
    CudaDevices,
    CudaSlice,
    CudaUnavailable,
    CupyCudaApi,
    InMemoryCudaApi,
    SliceNotZeroed,
    plan_stream_copies,
)
from thaw.platform.cuda_copy import SliceOpenError, open_slice
from thaw.platform.devices import DeviceBackend

KiB = 1024
PAGE = 4 * KiB
CANARY = 0xA5


def make_backend(*totals: int, **options: Any) -> tuple[CudaDevices, InMemoryCudaApi]:
    api = InMemoryCudaApi(totals)
    options.setdefault("reserve_bytes", 0)
    options.setdefault("instance_overhead_bytes", 0)
    options.setdefault("granularity", PAGE)
    return CudaDevices(api, **options), api


def used(devices: CudaDevices) -> dict[str, int]:
    return {u.id: u.used for u in devices.usage()}


def tenant_ptr(api: InMemoryCudaApi, sl: CudaSlice) -> int:
    """Where the instance's mapping of the slice points (its cudaIpcOpenMemHandle)."""
    return api.open_handle(bytes.fromhex(sl.ipc_handle))


def slice_stream(api: InMemoryCudaApi, sl: CudaSlice) -> int:
    ptr = tenant_ptr(api, sl)
    memsets = [c for c in api.calls_named("memset") if c[2] == ptr]
    return int(memsets[0][5])


# ---- the DeviceBackend contract and packing ----------------------------------------------


def test_is_a_device_backend_reporting_every_gpu() -> None:
    devices, _ = make_backend(64 * KiB, 32 * KiB)
    backend: DeviceBackend = devices
    assert backend.kind == "cuda"
    assert [(u.id, u.kind, u.capacity, u.used) for u in backend.usage()] == [
        ("cuda0", "cuda", 64 * KiB, 0), ("cuda1", "cuda", 32 * KiB, 0)]


def test_best_fit_picks_the_device_left_with_least_room() -> None:
    devices, _ = make_backend(40 * KiB, 24 * KiB, 32 * KiB)
    first = devices.allocate(20 * KiB, "a")  # leaves 20 / 4 / 12: cuda1 fits tightest
    second = devices.allocate(12 * KiB, "b")  # 28 / - / 20: cuda2 is tighter than cuda0
    third = devices.allocate(4 * KiB, "c")  # cuda1 has exactly 4 KiB left
    fourth = devices.allocate(24 * KiB, "d")  # only cuda0 still has 24 KiB
    assert [s.device_id for s in (first, second, third, fourth)] == [
        "cuda1", "cuda2", "cuda1", "cuda0"]
    assert used(devices) == {"cuda0": 24 * KiB, "cuda1": 24 * KiB, "cuda2": 12 * KiB}


def test_refuses_a_slice_no_device_fits_and_books_nothing() -> None:
    devices, api = make_backend(32 * KiB, 32 * KiB)
    devices.allocate(20 * KiB, "a")
    devices.allocate(20 * KiB, "b")
    mallocs = len(api.calls_named("malloc"))
    with pytest.raises(OutOfMemory, match=r"no GPU has room for a 16384-byte slice") as info:
        devices.allocate(16 * KiB, "c")
    assert "cuda0 12288" in info.value.message and "cuda1 12288" in info.value.message
    assert len(api.calls_named("malloc")) == mallocs
    assert used(devices) == {"cuda0": 20 * KiB, "cuda1": 20 * KiB}


def test_books_rounded_size_plus_instance_overhead_within_capacity_less_reserve() -> None:
    devices, api = make_backend(10 * PAGE, reserve_bytes=2 * PAGE,
                                instance_overhead_bytes=PAGE, granularity=2 * PAGE)
    assert [u.capacity for u in devices.usage()] == [8 * PAGE]
    sl = devices.allocate(1, "a")
    assert (sl.size, sl.allocated) == (1, 2 * PAGE)
    assert api.calls_named("malloc")[-1] == ("malloc", 0, 2 * PAGE)
    assert used(devices) == {"cuda0": 3 * PAGE}
    devices.allocate(3 * PAGE, "b")  # 4 pages + 1: 8 of 8 booked
    with pytest.raises(OutOfMemory):
        devices.allocate(1, "c")


def test_a_reserve_that_leaves_nothing_names_its_key() -> None:
    with pytest.raises(InvalidArgument) as info:
        make_backend(8 * KiB, reserve_bytes=8 * KiB)
    assert info.value.field == "reserve_bytes"


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_rejects_a_bad_size(size: Any) -> None:
    devices, _ = make_backend(8 * KiB)
    with pytest.raises(InvalidArgument) as info:
        devices.allocate(size, "a")
    assert info.value.field == "size"


def test_a_driver_refusal_moves_on_to_the_next_device() -> None:
    devices, api = make_backend(32 * KiB, 32 * KiB)
    api.malloc(0, 28 * KiB)  # another process took most of cuda0 behind the books' back
    sl = devices.allocate(16 * KiB, "a")  # best fit says cuda0 (a tie, lower index)
    assert [c[1] for c in api.calls_named("malloc")[1:]] == [0, 1]
    assert sl.device_id == "cuda1"
    assert used(devices) == {"cuda0": 0, "cuda1": 16 * KiB}
    api.malloc(1, 16 * KiB)
    with pytest.raises(OutOfMemory, match="cuda0 refused it"):
        devices.allocate(16 * KiB, "b")
    assert used(devices) == {"cuda0": 0, "cuda1": 16 * KiB}


def test_a_failed_setup_gives_back_the_allocation() -> None:
    devices, api = make_backend(32 * KiB)
    api.fail_next("ipc_handle", ThawError("cudaErrorMapBufferObjectFailed"))
    with pytest.raises(ThawError, match="cudaErrorMapBufferObjectFailed"):
        devices.allocate(16 * KiB, "a")
    assert api.allocations == {} and api.streams == {}
    assert used(devices) == {"cuda0": 0}


class SliceLifecycle(RuleBasedStateMachine):
    """Any sequence of allocations and releases: books never pass capacity, every
    placement is a best fit, slices never share memory, and freed memory is zero."""

    OVERHEAD = PAGE

    def __init__(self) -> None:
        super().__init__()
        self.api = InMemoryCudaApi([64 * KiB, 48 * KiB, 32 * KiB])
        self.devices = CudaDevices(self.api, reserve_bytes=4 * KiB,
                                   instance_overhead_bytes=self.OVERHEAD, granularity=PAGE)
        self.live: dict[str, tuple[CudaSlice, int]] = {}
        self.next_pattern = 1

    slices = Bundle("slices")

    def booked(self, size: int) -> int:
        return -(-size // PAGE) * PAGE + self.OVERHEAD

    @rule(target=slices, size=st.integers(1, 40 * KiB))
    def allocate(self, size: int) -> Any:
        free = {u.id: u.capacity - u.used for u in self.devices.usage()}
        need = self.booked(size)
        calls_before = len(self.api.calls)
        try:
            sl = self.devices.allocate(size, "t")
        except OutOfMemory as exc:
            # Refused only where the books say no room, or where the driver said no
            # (freed memory fragments, on a real GPU as in the fake).
            for device_id, room in free.items():
                assert room < need or f"{device_id} refused" in str(exc)
            return multiple()
        # Best fit, unless better-fitting devices were tried first and refused by the
        # driver: each malloc before the last one was such a refusal.
        tried = [f"cuda{c[1]}" for c in self.api.calls[calls_before:] if c[0] == "malloc"]
        refused = set(tried[:-1])
        assert tried[-1] == sl.device_id
        candidates = [r - need for d, r in free.items() if r >= need and d not in refused]
        assert free[sl.device_id] - need == min(candidates)
        pattern = self.next_pattern
        self.next_pattern = self.next_pattern % 250 + 1
        self.api.write(tenant_ptr(self.api, sl), 0, bytes([pattern]) * sl.allocated)
        self.live[sl.id] = (sl, pattern)
        return sl

    @rule(sl=consumes(slices))
    def release(self, sl: CudaSlice) -> None:
        alloc = self.api.allocations[tenant_ptr(self.api, sl)]
        self.devices.release(sl.id)
        del self.live[sl.id]
        freed = self.api.memory[alloc.device][alloc.start:alloc.start + alloc.size]
        assert freed == bytes(alloc.size)

    @rule()
    def release_unknown(self) -> None:
        with pytest.raises(NotFound):
            self.devices.release("nobody-00000000")

    @invariant()
    def books_match_the_live_slices(self) -> None:
        usage = {u.id: u for u in self.devices.usage()}
        for u in usage.values():
            assert 0 <= u.used <= u.capacity
        for device_id in usage:
            assert usage[device_id].used == sum(
                self.booked(sl.size) for sl, _ in self.live.values() if sl.device_id == device_id)
        assert len(self.api.allocations) == len(self.live)

    @invariant()
    def each_slice_holds_only_its_own_bytes(self) -> None:
        for sl, pattern in self.live.values():
            data = self.api.read(tenant_ptr(self.api, sl), 0, sl.allocated)
            assert data == bytes([pattern]) * sl.allocated


TestSliceLifecycle = SliceLifecycle.TestCase
TestSliceLifecycle.settings = settings(max_examples=60, stateful_step_count=25,
                                       deadline=None)


# ---- zeroing -----------------------------------------------------------------------------


def test_release_zeroes_on_the_slice_stream_and_waits_before_freeing() -> None:
    devices, api = make_backend(64 * KiB)
    sl = devices.allocate(10 * KiB, "a")
    ptr, stream = tenant_ptr(api, sl), slice_stream(api, sl)
    start = len(api.calls)
    devices.release(sl.id)
    assert api.calls[start:] == [
        ("memset", 0, ptr, 0, 12 * KiB, stream),
        ("synchronize", 0, stream),
        ("destroy_stream", 0, stream),
        ("free", 0, ptr),
    ]
    with pytest.raises(NotFound):
        devices.release(sl.id)


def test_a_new_slice_is_zeroed_before_it_is_handed_out() -> None:
    devices, api = make_backend(64 * KiB)
    stale = api.malloc(0, 16 * KiB)
    api.write(stale, 0, bytes([CANARY]) * 16 * KiB)
    api.free(0, stale)  # another process's leftovers: the driver may hand them to us
    sl = devices.allocate(16 * KiB, "a")
    ptr = tenant_ptr(api, sl)
    assert ptr == stale
    assert api.read(ptr, 0, 16 * KiB) == bytes(16 * KiB)


def test_canary_a_released_slice_leaks_nothing_to_the_next_tenant() -> None:
    devices, api = make_backend(64 * KiB, 64 * KiB)
    # The fake keeps freed bytes and reuses addresses, so unscrubbed memory would show:
    probe = api.malloc(1, 8 * KiB)
    api.write(probe, 0, bytes([CANARY]) * 8 * KiB)
    api.free(1, probe)
    assert api.read(api.malloc(1, 8 * KiB), 0, 8 * KiB) == bytes([CANARY]) * 8 * KiB

    first = devices.allocate(16 * KiB, "tenant-a")
    a_ptr = tenant_ptr(api, first)
    api.write(a_ptr, 0, bytes([CANARY]) * first.allocated)
    a_memory = api.allocations[a_ptr]
    devices.release(first.id)
    freed = api.memory[a_memory.device][a_memory.start:a_memory.start + a_memory.size]
    assert CANARY not in freed  # scrubbed as it was given back, before anyone asked
    second = devices.allocate(16 * KiB, "tenant-b")
    b_ptr = tenant_ptr(api, second)
    assert (second.device_id, b_ptr) == (first.device_id, a_ptr)  # the very same memory
    assert CANARY not in api.read(b_ptr, 0, second.allocated)


def test_a_slice_that_cannot_be_zeroed_is_quarantined_not_freed() -> None:
    devices, api = make_backend(32 * KiB)
    sl = devices.allocate(16 * KiB, "a")
    ptr = tenant_ptr(api, sl)
    api.write(ptr, 0, bytes([CANARY]) * 16 * KiB)
    api.fail_next("synchronize", ThawError("cudaErrorIllegalAddress"))
    with pytest.raises(SliceNotZeroed, match="could not be zeroed.*never handed out"):
        devices.release(sl.id)
    assert api.calls_named("free") == []
    assert used(devices) == {"cuda0": 16 * KiB}
    with pytest.raises(NotFound):
        devices.release(sl.id)
    other = devices.allocate(16 * KiB, "b")
    assert tenant_ptr(api, other) != ptr
    devices.close()  # tries the scrub once more, then frees
    assert api.allocations == {} and used(devices) == {"cuda0": 0}


def test_close_scrubs_and_frees_every_slice() -> None:
    devices, api = make_backend(32 * KiB, 32 * KiB)
    for owner in ("a", "b", "c"):
        sl = devices.allocate(8 * KiB, owner)
        api.write(tenant_ptr(api, sl), 0, bytes([CANARY]) * 8 * KiB)
    devices.close()
    assert api.allocations == {} and api.streams == {}
    assert all(CANARY not in memory for memory in api.memory)


# ---- copies into a slice -----------------------------------------------------------------


def pattern(length: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, length, dtype=np.uint8).tobytes()


def test_copies_are_split_across_streams_and_cover_every_byte_once() -> None:
    devices, api = make_backend(256 * KiB)
    sl = devices.allocate(200 * KiB, "a")
    pieces = [(0, pattern(40 * KiB, 1)), (40 * KiB, pattern(30 * KiB, 2)),
              (100 * KiB, pattern(50 * KiB + 5, 3))]  # a gap at 70-100 KiB stays zero
    start = len(api.calls)
    stats = devices.copy_into_slice(sl, pieces, streams=3)
    calls = api.calls[start:]

    expected = bytearray(sl.allocated)
    for at, data in pieces:
        expected[at:at + len(data)] = data
    assert api.read(tenant_ptr(api, sl), 0, sl.allocated) == expected
    total = sum(len(data) for _, data in pieces)
    assert (stats.bytes, stats.streams) == (total, 3)

    created = [c[2] for c in calls if c[0] == "create_stream"]
    assert len(set(created)) == 3
    base = tenant_ptr(api, sl)
    written = np.zeros(sl.allocated, dtype=np.int64)
    per_stream = {s: 0 for s in created}
    for call in calls:
        if call[0] == "copy":
            _, _, dst, nbytes, stream = call
            written[dst - base:dst - base + nbytes] += 1
            per_stream[stream] += nbytes
    in_pieces = np.zeros(sl.allocated, dtype=np.int64)
    for at, data in pieces:
        in_pieces[at:at + len(data)] = 1
    assert (written == in_pieces).all()  # every byte of every piece exactly once
    assert all(abs(n - total / 3) < PAGE for n in per_stream.values())  # even shares
    for stream in created:  # each stream waited for after its last copy, then destroyed
        last_copy = max(i for i, c in enumerate(calls) if c[0] == "copy" and c[4] == stream)
        synced = calls.index(("synchronize", 0, stream))
        assert last_copy < synced < calls.index(("destroy_stream", 0, stream))


def test_a_failed_copy_still_waits_for_every_stream_before_raising() -> None:
    devices, api = make_backend(256 * KiB)
    sl = devices.allocate(128 * KiB, "a")
    api.fail_next("copy", ThawError("cudaErrorLaunchFailure"), after=2)
    source = bytearray(pattern(128 * KiB, 4))
    with pytest.raises(ThawError, match="cudaErrorLaunchFailure"):
        devices.copy_into_slice(sl, [(0, source)], streams=4)
    copy_streams = {c[4] for c in api.calls_named("copy")}
    assert copy_streams and all(("synchronize", 0, s) in api.calls for s in copy_streams)
    assert set(api.streams) == {slice_stream(api, sl)}  # the copy streams are gone
    assert all(not s.pending for s in api.streams.values())
    # Whatever was queued ran before the call returned, so the source is free to go.
    data = api.read(tenant_ptr(api, sl), 0, 64 * KiB)
    assert data == bytes(source[:64 * KiB])


def test_copies_must_land_inside_the_slice_without_overlapping() -> None:
    devices, api = make_backend(64 * KiB)
    sl = devices.allocate(16 * KiB, "a")
    start = len(api.calls)
    with pytest.raises(InvalidArgument, match="overrun"):
        devices.copy_into_slice(sl, [(12 * KiB, bytes(8 * KiB))])
    with pytest.raises(InvalidArgument, match="overlap"):
        devices.copy_into_slice(sl, [(0, bytes(8 * KiB)), (4 * KiB, bytes(4 * KiB))])
    with pytest.raises(InvalidArgument):
        devices.copy_into_slice(sl, [(0, b"x")], streams=0)
    with pytest.raises(NotFound):
        devices.copy_into_slice("nobody-00000000", [(0, b"x")])
    assert api.calls[start:] == []


def test_release_waits_for_a_copy_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    devices, api = make_backend(64 * KiB)
    sl = devices.allocate(32 * KiB, "a")
    own_stream = slice_stream(api, sl)
    copying, go_on = threading.Event(), threading.Event()
    real_synchronize = api.synchronize

    def slow_synchronize(device: int, stream: int) -> None:
        if stream != own_stream:
            copying.set()
            assert go_on.wait(10)
        real_synchronize(device, stream)

    monkeypatch.setattr(api, "synchronize", slow_synchronize)
    errors: list[BaseException] = []

    def run(fn: Any) -> threading.Thread:
        def target() -> None:
            try:
                fn()
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)
        thread = threading.Thread(target=target)
        thread.start()
        return thread

    copier = run(lambda: devices.copy_into_slice(sl, [(0, pattern(32 * KiB, 5))], streams=2))
    assert copying.wait(10)
    releaser = run(lambda: devices.release(sl.id))
    releaser.join(0.2)
    assert releaser.is_alive() and len(api.calls_named("memset")) == 1  # still waiting
    go_on.set()
    copier.join(10)
    releaser.join(10)
    assert errors == []
    names = [c[0] for c in api.calls]
    assert names.index("free") > max(i for i, n in enumerate(names) if n == "copy")
    assert api.allocations == {} and CANARY not in api.memory[0]


@given(lengths=st.lists(st.tuples(st.integers(0, 3 * PAGE), st.integers(0, 70_000)),
                        max_size=8),
       streams=st.integers(1, 8))
def test_stream_plan_covers_each_byte_once_in_even_shares(
        lengths: list[tuple[int, int]], streams: int) -> None:
    pieces: list[tuple[int, int]] = []
    at = 0
    for gap, length in lengths:
        pieces.append((at + gap, length))
        at += gap + length
    order = list(range(len(pieces)))
    np.random.default_rng(len(pieces)).shuffle(order)
    shuffled = [pieces[i] for i in order]  # the plan sorts by slice offset itself
    plan = plan_stream_copies(shuffled, streams)

    total = sum(length for _, length in pieces)
    assert len(plan) <= streams and all(plan)
    covered: list[tuple[int, int]] = []
    for ops in plan:
        assert abs(sum(op.length for op in ops) - total / streams) < PAGE
        for op in ops:
            offset, length = shuffled[op.piece]
            assert op.length > 0 and op.start >= 0 and op.start + op.length <= length
            covered.append((offset + op.start, op.length))
    # In order, back to back within each piece, nothing twice and nothing missed:
    assert sorted(covered) == covered
    expected = [(offset, length) for offset, length in pieces if length]
    merged: list[list[int]] = []
    for offset, length in covered:
        if merged and merged[-1][0] + merged[-1][1] == offset and any(
                o <= offset < o + n for o, n in expected if o < offset):
            merged[-1][1] += length
        else:
            merged.append([offset, length])
    assert [tuple(m) for m in merged] == expected


class ArenaSource:
    """A ChunkSource over one in-memory arena, as the disk tier would serve it."""

    def __init__(self, arena: bytes, refs: list[ChunkRef]) -> None:
        self.by_digest = {ref.digest: arena[ref.offset:ref.end] for ref in refs}

    def read_into(self, digest: str, out: memoryview) -> None:
        out[:] = self.by_digest[digest]


def arena_refs(arena: bytes, chunk: int) -> list[ChunkRef]:
    return [ChunkRef(digest=hashlib.sha256(arena[at:at + chunk]).hexdigest(), offset=at,
                     length=len(arena[at:at + chunk]), stored_length=len(arena[at:at + chunk]))
            for at in range(0, len(arena), chunk)]


def test_restore_from_the_pinned_tier_copies_runs_on_several_streams() -> None:
    devices, api = make_backend(512 * KiB)
    arena = pattern(6 * 16 * KiB + 100, 6)
    refs = arena_refs(arena, 16 * KiB)
    pinned = PinnedTier(1 << 20)
    pinned.prewarm(refs, ArenaSource(arena, refs))  # one region, in arena order
    sl = devices.allocate(len(arena), "a")
    start = len(api.calls)
    stats = devices.restore_into_slice(sl, reversed(refs), pinned, streams=2)
    assert api.read(tenant_ptr(api, sl), 0, len(arena)) == arena
    assert stats.bytes == len(arena) and stats.streams == 2
    # The seven chunks form one run: one copy per stream, not one per chunk.
    assert len([c for c in api.calls[start:] if c[0] == "copy"]) == 2
    assert pinned.usage().pinned == 0  # held only during the copy


def test_restore_refuses_chunks_not_in_the_pinned_tier() -> None:
    devices, api = make_backend(512 * KiB)
    arena = pattern(4 * 16 * KiB, 7)
    refs = arena_refs(arena, 16 * KiB)
    pinned = PinnedTier(1 << 20)
    pinned.prewarm(refs[:3], ArenaSource(arena, refs))
    sl = devices.allocate(len(arena), "a")
    with pytest.raises(ChunkNotFound, match=refs[3].digest):
        devices.restore_into_slice(sl, refs, pinned)
    assert api.calls_named("copy") == []


# ---- MPS, the descriptor, missing CuPy ---------------------------------------------------


def test_compute_share_is_data_on_the_slice_and_env_only_under_mps() -> None:
    with_mps, _ = make_backend(64 * KiB, mps=True)
    shared = with_mps.allocate(8 * KiB, "a", compute_percent=25)
    assert (shared.compute_percent, shared.mps) == (25, True)
    # Every instance sees only its slice's GPU; the share is added only under MPS.
    only_its_gpu = {"CUDA_VISIBLE_DEVICES": shared.device_uuid}
    assert shared.instance_env() == {**only_its_gpu, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}
    assert with_mps.allocate(8 * KiB, "b").instance_env() == only_its_gpu

    without, _ = make_backend(64 * KiB, mps=False)
    unenforced = without.allocate(8 * KiB, "a", compute_percent=25)
    assert (unenforced.compute_percent, unenforced.instance_env()) == (25, only_its_gpu)
    with pytest.raises(InvalidArgument) as info:
        without.allocate(8 * KiB, "b", compute_percent=101)
    assert info.value.field == "gpu_compute"


def test_mps_is_asked_of_the_api_unless_configured() -> None:
    assert CudaDevices(InMemoryCudaApi([64 * KiB], mps=True), reserve_bytes=0,
                       instance_overhead_bytes=0).mps
    assert not CudaDevices(InMemoryCudaApi([64 * KiB], mps=False), reserve_bytes=0,
                           instance_overhead_bytes=0).mps


def test_slice_carries_what_the_instance_needs_to_open_it() -> None:
    devices, api = make_backend(64 * KiB, 64 * KiB)
    devices.allocate(40 * KiB, "x")
    sl = devices.allocate(40 * KiB, "a")
    assert isinstance(sl, CudaSlice) and sl.path == ""
    assert (sl.device_index, sl.pci_bus_id, sl.device_uuid) == (
        1, "0000:02:00.0", "GPU-00000000-0000-0000-0000-000000000001")
    assert len(bytes.fromhex(sl.ipc_handle)) == 64
    descriptor = sl.descriptor()
    inspect.signature(open_slice).bind(**descriptor)  # the instance's side takes exactly these
    assert descriptor["size"] == 40 * KiB and tenant_ptr(api, sl) in api.allocations


def test_missing_cupy_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    with pytest.raises(CudaUnavailable, match=r"needs CuPy.*cupy-cuda12x.*THAW_DEVICE=host"):
        CudaDevices()
    with pytest.raises(CudaUnavailable, match="needs CuPy"):
        CupyCudaApi()


class FakeCudaRuntimeError(RuntimeError):
    """Shaped like cupy's CUDARuntimeError: a status code and a message."""

    def __init__(self, status: int) -> None:
        super().__init__(f"cudaError {status}")
        self.status = status


def fake_cupy(device_count: Any, current: list[int] | None = None,
              **runtime_functions: Any) -> types.ModuleType:
    """A stand-in `cupy` module exposing only what CupyCudaApi touches."""
    made_current = current if current is not None else []

    class Device:
        def __init__(self, index: int) -> None:
            self.index = index

        def __enter__(self) -> None:
            made_current.append(self.index)

        def __exit__(self, *exc: object) -> None:
            return None

    runtime = types.SimpleNamespace(getDeviceCount=device_count,
                                    CUDARuntimeError=FakeCudaRuntimeError, **runtime_functions)
    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        runtime=runtime, Device=Device,
        memory=types.SimpleNamespace(OutOfMemoryError=MemoryError))
    return module


def test_no_gpu_or_no_driver_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(lambda: 0))
    with pytest.raises(CudaUnavailable, match="found no GPU"):
        CudaDevices()

    def no_driver() -> int:
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(no_driver))
    with pytest.raises(CudaUnavailable, match="no usable CUDA driver.*Insufficient"):
        CudaDevices()


def test_the_cupy_adapter_translates_cuda_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(status: int) -> Any:
        def call(*args: Any) -> Any:
            raise FakeCudaRuntimeError(status)
        return call

    current: list[int] = []
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(
        lambda: 2, current, malloc=refuse(2), memsetAsync=refuse(700)))
    api = CupyCudaApi()
    with pytest.raises(OutOfMemory, match="allocating 4096 bytes on cuda1"):
        api.malloc(1, 4096)
    with pytest.raises(ThawError, match="zeroing a slice on cuda0 failed") as info:
        api.memset_async(0, 0x1000, 0, 4096, 7)
    assert not isinstance(info.value, OutOfMemory)
    assert current == [1, 0]  # each call ran with its device current


def test_the_cupy_adapter_copies_from_the_host_address(monkeypatch: pytest.MonkeyPatch) -> None:
    copies: list[tuple[int, ...]] = []
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(
        lambda: 1, memcpyAsync=lambda *args: copies.append(args)))
    source = np.arange(64, dtype=np.uint8)
    CupyCudaApi().copy_to_device_async(0, 0x7000, source.data[16:48].toreadonly(), 9)
    assert copies == [(0x7000, source.ctypes.data + 16, 32, 1, 9)]  # 1: HostToDevice


def test_the_cupy_adapter_describes_gpus_with_or_without_nvml(
        monkeypatch: pytest.MonkeyPatch) -> None:
    raw_uuid = bytes(range(16))
    current: list[int] = []
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(
        lambda: 1, current,
        getDeviceProperties=lambda i: {"name": b"Fake A100", "uuid": raw_uuid,
                                       "totalGlobalMem": 40 << 30},
        deviceGetPCIBusId=lambda i: "0000:3B:00.0"))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    (info,) = CupyCudaApi().devices()
    assert (info.index, info.name, info.pci_bus_id, info.total_bytes) == (
        0, "Fake A100", "0000:3B:00.0", 40 << 30)
    assert info.uuid == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert current == []  # describing a GPU must not create a context on it

    class NVMLError(Exception):
        pass

    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByPciBusId = lambda bus: {"0000:3B:00.0": "h"}[bus]  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=39 << 30)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = lambda h: "GPU-from-nvml"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    (info,) = CupyCudaApi().devices()
    assert (info.total_bytes, info.uuid) == (39 << 30, "GPU-from-nvml")


# ---- the instance's side, over a host buffer posing as device memory ---------------------


class FakeCupyForOpening:
    """Just enough of CuPy for open_slice: "device memory" is a ctypes buffer, arrays are
    NumPy views of it, so torch's DLPack import of them shares its bytes as on a GPU."""

    def __init__(self, buffer: ctypes.Array[ctypes.c_uint8]) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.address = ctypes.addressof(buffer)
        calls = self.calls

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            def __enter__(self) -> None:
                calls.append(("device", self.index))

            def __exit__(self, *exc: object) -> None:
                return None

        class UnownedMemory:
            def __init__(self, ptr: int, size: int, owner: object,
                         device_id: int | None = None) -> None:
                self.ptr, self.size, self.owner, self.device_id = ptr, size, owner, device_id

        class MemoryPointer:
            def __init__(self, mem: UnownedMemory, offset: int) -> None:
                self.mem, self.ptr = mem, mem.ptr + offset

        def ndarray(shape: tuple[int], dtype: Any, memptr: MemoryPointer) -> np.ndarray:
            (size,) = shape
            return np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(memptr.ptr))

        def ipc_open(handle: bytes, flags: int) -> int:
            calls.append(("open", handle, flags))
            return self.address

        runtime = types.SimpleNamespace(
            ipcOpenMemHandle=ipc_open,
            ipcCloseMemHandle=lambda ptr: calls.append(("close", ptr)),
            deviceGetByPCIBusId=lambda bus: {"0000:05:00.0": 3}[bus])
        self.module = types.ModuleType("cupy")
        self.module.uint8 = np.uint8  # type: ignore[attr-defined]
        self.module.ndarray = ndarray  # type: ignore[attr-defined]
        self.module.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
            Device=Device, UnownedMemory=UnownedMemory, MemoryPointer=MemoryPointer,
            runtime=runtime)


@pytest.fixture
def device_buffer(monkeypatch: pytest.MonkeyPatch
                  ) -> Iterator[tuple[ctypes.Array[ctypes.c_uint8], FakeCupyForOpening]]:
    buffer = (ctypes.c_uint8 * 64)()
    fake = FakeCupyForOpening(buffer)
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    yield buffer, fake


def test_open_slice_finds_the_gpu_by_bus_id_and_views_tensors_in_place(
        device_buffer: tuple[ctypes.Array[ctypes.c_uint8], FakeCupyForOpening]) -> None:
    torch = pytest.importorskip("torch")
    buffer, fake = device_buffer
    struct.pack_into("<4f", buffer, 16, 1.0, 2.0, 3.0, 4.0)
    handle = os.urandom(64)
    opened = open_slice(handle.hex(), 64, device_index=0, pci_bus_id="0000:05:00.0")
    assert opened.device == 3  # this process numbers the GPU differently from the agent
    assert ("open", handle, 0x01) in fake.calls and ("device", 3) in fake.calls

    matrix = opened.tensor(16, 16, "float32", shape=(2, 2))
    assert matrix.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    transposed = opened.tensor(16, 16, "float32", shape=(2, 2), stride=(1, 2))
    assert transposed.tolist() == [[1.0, 3.0], [2.0, 4.0]]
    struct.pack_into("<f", buffer, 16, 9.0)  # the tenant's view is the memory, not a copy
    assert matrix[0, 0].item() == 9.0
    storage = opened.storage(16, 16)
    assert storage.nbytes() == 16 and storage.data_ptr() == fake.address + 16
    assert opened.tensor(0, 8).dtype == torch.uint8

    opened.close()
    assert ("close", fake.address) in fake.calls
    with pytest.raises(SliceOpenError, match="closed"):
        opened.tensor(0, 8)


@pytest.mark.parametrize(("offset", "nbytes", "dtype", "message"), [
    (60, 8, "uint8", "outside"), (-1, 4, "uint8", "outside"),
    (2, 4, "float32", "aligned"), (0, 6, "float32", "aligned"), (0, 4, "Tensor", "dtype")])
def test_open_slice_refuses_views_it_cannot_make(
        device_buffer: tuple[ctypes.Array[ctypes.c_uint8], FakeCupyForOpening],
        offset: int, nbytes: int, dtype: str, message: str) -> None:
    pytest.importorskip("torch")
    opened = open_slice(os.urandom(64).hex(), 64, device_index=0)
    with pytest.raises(SliceOpenError, match=message):
        opened.tensor(offset, nbytes, dtype)


def test_open_slice_checks_its_arguments_and_needs_cupy(
        monkeypatch: pytest.MonkeyPatch,
        device_buffer: tuple[ctypes.Array[ctypes.c_uint8], FakeCupyForOpening]) -> None:
    with pytest.raises(SliceOpenError, match="not a CUDA IPC handle"):
        open_slice("abcd", 64, device_index=0)
    with pytest.raises(SliceOpenError, match="size"):
        open_slice(os.urandom(64).hex(), 0, device_index=0)
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(SliceOpenError, match="needs CuPy"):
        open_slice(os.urandom(64).hex(), 64, device_index=0)
