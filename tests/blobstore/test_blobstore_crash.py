"""A writer killed (SIGKILL) mid-put never leaves a torn chunk visible."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from thaw.blobstore import DiskTier

KILLS = 30

# Puts chunks forever: 2 MiB each, alternately incompressible and compressible, so kills
# land in hashing, compressing, writing, fsync and rename alike. The disk is made slow
# (64 KiB per write call, 1 ms apart) so that most kills land in the middle of writing a
# file: a store that wrote chunks in place would show torn ones here.
WRITER = """
import os, sys, time
from thaw.blobstore import DiskTier

real_write = os.write
def slow_write(fd, data):
    time.sleep(0.001)
    return real_write(fd, data[: 64 << 10])
os.write = slow_write

tier = DiskTier(sys.argv[1])
print("ready", flush=True)
n = 0
while True:
    block = os.urandom(2 << 20)
    if n % 2:
        block = bytes(1 << 20) + block[: 1 << 20]
    tier.put(block)
    n += 1
"""


def test_killed_writers_never_leave_a_torn_chunk(tmp_path: Path) -> None:
    root = tmp_path / "chunks"
    before = DiskTier(root)
    # Chunks already there must survive writers dying next to them.
    existing = {before.put(os.urandom(1 << 20)).digest for _ in range(3)}
    rng = random.Random(20240501)
    for _ in range(KILLS):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root)],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()

    tier = DiskTier(root)
    digests = set(tier.digests())
    assert existing <= digests
    for digest in digests:
        assert tier.has(digest)
        tier.get(digest)  # raises CorruptChunk if any visible chunk were torn
    assert all(not name.startswith(".") for name in digests)

    # BLAKE3 chunks sit in shards under root/blake3 (blobstore/disk.py's layout).
    leftovers = sorted(root.glob("blake3/*/.tmp.*"))
    result = tier.gc(digests)
    assert result.removed == len(leftovers)
    assert sorted(root.glob("blake3/*/.tmp.*")) == []
    assert set(tier.digests()) == digests
