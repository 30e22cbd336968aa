"""Content-addressed chunk store: a disk tier, a pinned host-memory tier, and the pipeline
that stores arenas as chunks and streams them back into slices (DESIGN.md section 5)."""

from .allocators import AnonymousMemoryAllocator, CudaPinnedAllocator, HostMemoryAllocator
from .chunks import CHUNK_SIZE, ChunkRef, Compression, digest_of
from .disk import LZ4_MIN_SAVING, DiskTier, GcResult, StoredChunk
from .pinned import ChunkSource, PinnedSpan, PinnedTier, PinnedUsage
from .pipeline import Refetch, RestoreStats, restore_arena, store_arena

__all__ = [
    "CHUNK_SIZE",
    "LZ4_MIN_SAVING",
    "ChunkRef",
    "ChunkSource",
    "Compression",
    "CudaPinnedAllocator",
    "DiskTier",
    "GcResult",
    "HostMemoryAllocator",
    "AnonymousMemoryAllocator",
    "PinnedSpan",
    "PinnedTier",
    "PinnedUsage",
    "Refetch",
    "RestoreStats",
    "StoredChunk",
    "digest_of",
    "restore_arena",
    "store_arena",
]
