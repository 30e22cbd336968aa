"""Content-addressed chunk store: a disk tier, a pinned host-memory tier, and the pipeline
that stores arenas as chunks and streams them back into slices (DESIGN.md section 5)."""

from .allocators import (
    MEMFD_PREFIX,
    AnonymousMemoryAllocator,
    CudaPinnedAllocator,
    HostMemoryAllocator,
    HostRegion,
    MemfdAllocator,
    host_allocator,
)
from .chunks import CHUNK_SIZE, ChunkRef, Compression, digest_of
from .disk import LZ4_MIN_SAVING, DiskTier, GcResult, StoredChunk
from .pagelock import CudaHostRegistrar, LockRefused, MlockLocker, PageLocker
from .pinned import ChunkSource, PinnedSpan, PinnedTier, PinnedUsage
from .pipeline import Refetch, RestoreStats, restore_arena, store_arena

__all__ = [
    "CHUNK_SIZE",
    "LZ4_MIN_SAVING",
    "MEMFD_PREFIX",
    "ChunkRef",
    "ChunkSource",
    "Compression",
    "CudaHostRegistrar",
    "CudaPinnedAllocator",
    "DiskTier",
    "GcResult",
    "HostMemoryAllocator",
    "HostRegion",
    "AnonymousMemoryAllocator",
    "LockRefused",
    "MemfdAllocator",
    "MlockLocker",
    "PageLocker",
    "PinnedSpan",
    "PinnedTier",
    "PinnedUsage",
    "Refetch",
    "RestoreStats",
    "StoredChunk",
    "digest_of",
    "host_allocator",
    "restore_arena",
    "store_arena",
]
