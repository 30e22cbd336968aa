"""A build's "storing the snapshot" step follows the bytes stored: store_capture calls
its progress with (done, total) over every arena, in order, ending at the total, though
chunks are stored on several threads."""

from __future__ import annotations

import json
import os
from pathlib import Path

from thaw.blobstore import DiskTier, PinnedTier
from thaw.blobstore.chunks import CHUNK_SIZE
from thaw.platform.snapshots import NodeSnapshots


def test_storing_a_capture_reports_bytes_done_of_the_total(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "snapshot.json").write_text(json.dumps({"format": 1}))
    (out / "state.pickle").write_bytes(b"p" * 1000)
    # Several chunks, unlike contents (no dedupe hides a chunk's bytes).
    (out / "host.arena").write_bytes(os.urandom(3 * CHUNK_SIZE + 123))
    snapshots = NodeSnapshots(DiskTier(tmp_path / "chunks"), PinnedTier(1 << 20),
                              tmp_path / "shm")
    seen: list[tuple[int, int]] = []
    manifest, _ = snapshots.store_capture(out, function="t/f", version="1",
                                          progress=lambda done, total: seen.append(
                                              (done, total)))
    total = 1000 + 3 * CHUNK_SIZE + 123
    assert {t for _, t in seen} == {total}
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and dones[-1] == total
    assert len(seen) == 1 + 4  # one pickle chunk, four host chunks
    assert manifest.host.size == 3 * CHUNK_SIZE + 123
    # Without a progress callback nothing changes.
    again, _ = snapshots.store_capture(out, function="t/f", version="2")
    assert again.host.chunks == manifest.host.chunks
