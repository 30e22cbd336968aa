"""The pinned tier: byte accounting, LRU eviction, pins, dedupe, prewarm from disk."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from thaw.blobstore import (
    AnonymousMemoryAllocator,
    ChunkRef,
    DiskTier,
    HostRegion,
    PinnedTier,
    digest_of,
    store_arena,
)
from thaw.core.errors import ChunkNotFound, CorruptChunk, InvalidArgument, OutOfMemory

KIB = 1024


def block(tag: int, size: int = 4 * KIB) -> bytes:
    return random.Random(tag).randbytes(size)


class RecordingAllocator(AnonymousMemoryAllocator):
    """Host memory that records what the tier gives back."""

    def __init__(self) -> None:
        self.allocated: list[int] = []
        self.discarded: list[tuple[int, int]] = []
        self.freed = 0

    def allocate(self, nbytes: int) -> HostRegion:
        self.allocated.append(nbytes)
        return super().allocate(nbytes)

    def discard(self, region: HostRegion, start: int, length: int) -> bool:
        self.discarded.append((start, length))
        return super().discard(region, start, length)

    def free(self, region: HostRegion) -> None:
        self.freed += 1
        super().free(region)


@pytest.fixture
def disk(tmp_path: Path) -> DiskTier:
    return DiskTier(tmp_path / "chunks")


def test_put_get_and_usage() -> None:
    tier = PinnedTier(64 * KIB)
    data = block(1)
    digest = tier.put(data)
    assert digest == digest_of(data)
    assert tier.has(digest)
    assert tier.get(digest) == data
    with pytest.raises(ChunkNotFound):
        tier.get(digest_of(b"absent"))
    usage = tier.usage()
    assert (usage.capacity, usage.used, usage.chunks) == (64 * KIB, len(data), 1)
    assert (usage.hits, usage.misses, usage.evictions, usage.pinned) == (1, 1, 0, 0)


def test_put_refuses_bytes_that_do_not_match_the_digest() -> None:
    tier = PinnedTier(64 * KIB)
    wrong = digest_of(b"something else")
    with pytest.raises(CorruptChunk, match=wrong):
        tier.put(block(1), wrong)
    assert tier.usage().used == 0


def test_evicts_least_recently_used_first() -> None:
    tier = PinnedTier(3 * 4 * KIB)
    a, b, c = (tier.put(block(i)) for i in range(3))
    tier.get(a)  # a is now more recent than b and c
    d = tier.put(block(3))
    assert not tier.has(b)
    assert [tier.has(x) for x in (a, c, d)] == [True, True, True]
    tier.put(block(4))
    assert not tier.has(c)
    assert tier.digests() == [a, d, digest_of(block(4))]
    assert tier.usage().evictions == 2


def test_capacity_is_never_exceeded_under_concurrent_puts() -> None:
    capacity = 10 * 4 * KIB + 123
    tier = PinnedTier(capacity)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(tier.usage().used)

    def writer(worker: int) -> None:
        for i in range(60):
            tier.put(block(worker * 1000 + i, size=random.Random(i).choice([KIB, 4 * KIB])))

    watcher = threading.Thread(target=watch)
    watcher.start()
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    watcher.join()
    assert max(seen) <= capacity
    usage = tier.usage()
    assert usage.used <= capacity
    assert usage.used == sum(len(tier.get(d)) for d in tier.digests())


def test_pinned_chunks_are_not_evicted() -> None:
    tier = PinnedTier(2 * 4 * KIB)
    a = tier.put(block(1))
    b = tier.put(block(2))
    tier.pin([a])
    assert tier.usage().pinned == 4 * KIB
    tier.put(block(3))  # evicts b, the only unpinned chunk, although a is older
    assert tier.has(a) and not tier.has(b)
    assert tier.evict([a]) == 0 and tier.has(a)
    tier.unpin([a])
    assert tier.evict([a]) == 4 * KIB and not tier.has(a)


def test_out_of_memory_when_everything_left_is_pinned() -> None:
    tier = PinnedTier(2 * 4 * KIB)
    held = [tier.put(block(1)), tier.put(block(2))]
    with tier.hold(held) as spans:
        assert set(spans) == set(held)
        with pytest.raises(OutOfMemory):
            tier.put(block(3))
        assert all(tier.has(d) for d in held)
    tier.put(block(3))  # fits once the hold is over
    assert tier.usage().pinned == 0


def test_a_chunk_larger_than_the_tier_is_out_of_memory() -> None:
    tier = PinnedTier(4 * KIB)
    with pytest.raises(OutOfMemory):
        tier.put(block(1, size=4 * KIB + 1))
    assert tier.usage().used == 0


def test_pin_is_all_or_nothing_and_counted() -> None:
    tier = PinnedTier(64 * KIB)
    a = tier.put(block(1))
    with pytest.raises(ChunkNotFound):
        tier.pin([a, digest_of(b"absent")])
    assert tier.usage().pinned == 0
    tier.pin([a])
    tier.pin([a])
    tier.unpin([a])
    assert tier.evict([a]) == 0  # still pinned once
    tier.unpin([a])
    with pytest.raises(InvalidArgument):
        tier.unpin([a])


def test_hold_counts_hits_and_misses() -> None:
    tier = PinnedTier(64 * KIB)
    a = tier.put(block(1))
    absent = digest_of(b"absent")
    with tier.hold([a, absent, a]) as spans:
        assert list(spans) == [a]
        with spans[a].view() as view:
            assert bytes(view) == block(1)
    usage = tier.usage()
    assert (usage.hits, usage.misses, usage.pinned) == (1, 1, 0)


def test_prewarm_loads_from_disk_and_lays_chunks_out_in_one_region(disk: DiskTier) -> None:
    arena = b"".join(block(i) for i in range(6))
    refs = store_arena(disk, arena, chunk_size=4 * KIB)
    allocator = RecordingAllocator()
    tier = PinnedTier(1 << 20, allocator=allocator)
    assert tier.prewarm(refs, disk) == len(arena)
    assert allocator.allocated == [len(arena)]
    with tier.hold(r.digest for r in refs) as spans:
        regions = {id(span.region) for span in spans.values()}
        starts = [spans[r.digest].start for r in refs]
    assert len(regions) == 1
    assert starts == [r.offset for r in refs]
    assert tier.prewarm(refs, disk) == 0  # already here


def test_two_snapshots_with_identical_weights_are_held_once(disk: DiskTier) -> None:
    weights = b"".join(block(i) for i in range(4))
    refs_a = store_arena(disk, weights + block(100), chunk_size=4 * KIB)
    refs_b = store_arena(disk, weights + block(200), chunk_size=4 * KIB)
    tier = PinnedTier(1 << 20)
    assert tier.prewarm(refs_a, disk) == 5 * 4 * KIB
    assert tier.prewarm(refs_b, disk) == 4 * KIB  # only b's own chunk is new
    usage = tier.usage()
    assert usage.chunks == 6
    assert usage.used == 6 * 4 * KIB


def test_prewarm_verifies_what_comes_from_disk(disk: DiskTier) -> None:
    arena = b"".join(block(i) for i in range(4))
    refs = store_arena(disk, arena, chunk_size=4 * KIB)
    path = disk.path_of(refs[2].digest)
    assert path is not None
    damaged = bytearray(path.read_bytes())
    damaged[100] ^= 0xFF
    path.write_bytes(bytes(damaged))
    tier = PinnedTier(1 << 20)
    with pytest.raises(CorruptChunk, match=refs[2].digest):
        tier.prewarm(refs, disk)
    usage = tier.usage()
    assert (usage.chunks, usage.used, usage.pinned) == (0, 0, 0)  # nothing half-loaded kept


def test_prewarm_that_cannot_fit_loads_nothing(disk: DiskTier) -> None:
    refs = store_arena(disk, b"".join(block(i) for i in range(4)), chunk_size=4 * KIB)
    tier = PinnedTier(3 * 4 * KIB)
    keep = tier.put(block(99))
    tier.pin([keep])
    with pytest.raises(OutOfMemory):
        tier.prewarm(refs, disk)
    assert tier.digests() == [keep]
    assert tier.usage().used == 4 * KIB


def test_prewarm_does_not_evict_its_own_chunks(disk: DiskTier) -> None:
    refs = store_arena(disk, b"".join(block(i) for i in range(4)), chunk_size=4 * KIB)
    tier = PinnedTier(4 * 4 * KIB)
    tier.prewarm(refs[:2], disk)  # least recently used, but part of the snapshot
    tier.put(block(50))
    tier.put(block(51))
    tier.prewarm(refs, disk)
    assert all(tier.has(r.digest) for r in refs)


def test_eviction_gives_the_pages_back(disk: DiskTier) -> None:
    refs = store_arena(disk, b"".join(block(i) for i in range(3)), chunk_size=4 * KIB)
    allocator = RecordingAllocator()
    tier = PinnedTier(1 << 20, allocator=allocator)
    tier.prewarm(refs, disk)
    tier.evict([refs[1].digest])
    assert allocator.discarded == [(4 * KIB, 4 * KIB)]
    assert allocator.freed == 0  # the region still holds two chunks
    tier.evict([refs[0].digest, refs[2].digest])
    assert allocator.freed == 1
    assert tier.usage().used == 0


def test_ref_lengths_are_what_prewarm_reserves(disk: DiskTier) -> None:
    stored = disk.put(block(7, size=3000))  # not a whole page
    ref = ChunkRef(stored.digest, 0, 3000, stored.stored_length, stored.compression)
    tier = PinnedTier(3000)
    assert tier.prewarm([ref], disk) == 3000
    assert tier.get(ref.digest) == block(7, size=3000)


class PinnedTierMachine(RuleBasedStateMachine):
    """The tier against a model: an LRU list of (digest, size) plus pin counts."""

    CAPACITY = 10 * KIB

    def __init__(self) -> None:
        super().__init__()
        self.tier = PinnedTier(self.CAPACITY)
        self.order: list[str] = []  # least recently used first
        self.sizes: dict[str, int] = {}
        self.pins: dict[str, int] = {}

    def _touch(self, digest: str) -> None:
        self.order.remove(digest)
        self.order.append(digest)

    @rule(tag=st.integers(0, 12), size=st.sampled_from([KIB, 3 * KIB, 4 * KIB, 11 * KIB]))
    def put(self, tag: int, size: int) -> None:
        data = block(tag, size)
        digest = digest_of(data)
        if digest in self.sizes:
            self.tier.put(data)
            self._touch(digest)
            return
        shortfall = sum(self.sizes.values()) + size - self.CAPACITY
        victims = []
        for candidate in self.order:
            if shortfall <= 0:
                break
            if not self.pins.get(candidate):
                victims.append(candidate)
                shortfall -= self.sizes[candidate]
        if size > self.CAPACITY or shortfall > 0:
            with pytest.raises(OutOfMemory):
                self.tier.put(data)
            return
        self.tier.put(data)
        for victim in victims:
            self.order.remove(victim)
            del self.sizes[victim]
        self.order.append(digest)
        self.sizes[digest] = size

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        digest = data.draw(st.sampled_from(self.order))
        assert len(self.tier.get(digest)) == self.sizes[digest]
        self._touch(digest)

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        digest = data.draw(st.sampled_from(self.order))
        self.tier.pin([digest])
        self.pins[digest] = self.pins.get(digest, 0) + 1

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        digest = data.draw(st.sampled_from(sorted(d for d, n in self.pins.items() if n)))
        self.tier.unpin([digest])
        self.pins[digest] -= 1

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        digest = data.draw(st.sampled_from(self.order))
        freed = self.tier.evict([digest])
        if self.pins.get(digest):
            assert freed == 0
        else:
            assert freed == self.sizes.pop(digest)
            self.order.remove(digest)

    @invariant()
    def matches_the_model(self) -> None:
        usage = self.tier.usage()
        assert usage.used <= self.CAPACITY
        assert self.tier.digests() == self.order
        assert usage.used == sum(self.sizes.values())
        assert usage.pinned == sum(self.sizes[d] for d, n in self.pins.items() if n)


PinnedTierMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30,
                                               deadline=None)
test_pinned_tier_state_machine = PinnedTierMachine.TestCase
