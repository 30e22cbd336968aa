"""`thaw snapshot verify` checks what restores map, not only the blobstore's tiers: the
node's sealed memfds of a snapshot (host arena, pickle, snapshot.json) are hashed
against the manifest at their offsets and must carry their seals. An instance given
an arena memfd (another uid, over SCM_RIGHTS) cannot change it."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from thaw.blobstore import AnonymousMemoryAllocator, ChunkRef, DiskTier, PinnedTier, store_arena
from thaw.gateway.snapshots import _Summary
from thaw.platform.control import AgentService
from thaw.platform.memfds import ARENA_SEALS, missing_seals
from thaw.platform.snapshot_passes import ARENA_TIER, progress_for, verify_chunks
from thaw.platform.snapshots import NodeSnapshots, arena_key
from thaw.proto import agent_pb2, manifest_pb2
from thaw.snapshotter.manifest import arena_message, chunk_dicts

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB
# An unprivileged uid/gid for the process that plays the instance ("nobody").
INSTANCE_UID = 65534


def pattern(length: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(length))


def make_manifest(disk: DiskTier, host: bytes) -> manifest_pb2.SnapshotManifest:
    def arena(data: bytes) -> manifest_pb2.Arena:
        return arena_message(len(data), store_arena(disk, data, chunk_size=CHUNK))

    return manifest_pb2.SnapshotManifest(format=1, function="t/f", version="1",
                                         pickle=arena(b"pickled " + host[:8]),
                                         host=arena(host), device=arena(b""))


def host_refs(manifest: manifest_pb2.SnapshotManifest) -> list[ChunkRef]:
    return [ChunkRef.from_dict(d) for d in chunk_dicts(manifest.host)]


def verify(snapshots: NodeSnapshots, manifest: manifest_pb2.SnapshotManifest
           ) -> list[agent_pb2.BadChunk]:
    progress = progress_for(manifest)
    verify_chunks(snapshots, manifest, progress)
    assert progress.done_chunks == progress.total_chunks
    return progress.bad


@pytest.fixture
def snapshots(tmp_path: Path) -> NodeSnapshots:
    return NodeSnapshots(DiskTier(tmp_path / "chunks"), PinnedTier(8 * MiB), tmp_path / "shm")


def flip_after_restore(monkeypatch: pytest.MonkeyPatch, snapshots: NodeSnapshots,
                       size: int, at: int) -> None:
    """The node's own restore code fills memfds, then one byte of the `size`-byte
    arena goes wrong before it is sealed (the disk copy stays right)."""
    restore_into = snapshots.restore_into

    def corrupting(refs: list[ChunkRef], view: memoryview) -> None:
        restore_into(refs, view)
        if len(view) == size:
            view[at] ^= 0xFF

    monkeypatch.setattr(snapshots, "restore_into", corrupting)


def test_a_clean_snapshot_verifies_ok_with_its_memfds_counted(
        snapshots: NodeSnapshots) -> None:
    snap = make_manifest(snapshots.disk, pattern(300 * KiB, 1))
    before = progress_for(snap)
    assert verify(snapshots, snap) == []  # nothing materialized yet: the tiers alone
    made = snapshots.materialize(snap)
    progress = progress_for(snap)
    verify_chunks(snapshots, snap, progress)
    assert progress.bad == []
    # The three memfds restores map were read too: their bytes and one check each.
    assert progress.done_bytes == (before.total_bytes + snap.host.size + snap.pickle.size
                                   + len(made.snapshot_json.encode()))
    assert progress.total_chunks == (before.total_chunks + len(snap.host.chunks)
                                     + len(snap.pickle.chunks) + 1)


def test_a_wrong_byte_in_the_arena_is_bad_in_the_arena_tier_while_disk_is_fine(
        snapshots: NodeSnapshots, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = make_manifest(snapshots.disk, pattern(300 * KiB, 2))
    at = 2 * CHUNK + 17
    flip_after_restore(monkeypatch, snapshots, snap.host.size, at)
    made = snapshots.materialize(snap)
    assert missing_seals(made.host_arena.fd) == []  # sealed, but sealed wrong
    victim = next(ref for ref in host_refs(snap) if ref.offset <= at < ref.end)
    bad = verify(snapshots, snap)
    assert [(b.digest, b.tier) for b in bad] == [(victim.digest, ARENA_TIER)]
    assert f"thaw-arena-{arena_key(snap.host)}" in bad[0].reason
    assert f"offset {victim.offset}" in bad[0].reason
    # The disk tier really is fine: a fresh read of the chunk passes.
    assert len(snapshots.disk.get(victim.digest)) == victim.length


def test_an_altered_pinned_copy_shows_in_the_arena_built_from_it(tmp_path: Path) -> None:
    """Pageable anonymous memory is the one pinned allocator without seals: a byte
    altered there after its chunk was verified reaches the arena built from it."""
    snapshots = NodeSnapshots(DiskTier(tmp_path / "chunks"),
                              PinnedTier(8 * MiB, allocator=AnonymousMemoryAllocator()),
                              tmp_path / "shm")
    snap = make_manifest(snapshots.disk, pattern(200 * KiB, 3))
    snapshots.prewarm(snap)
    victim = host_refs(snap)[1]
    with snapshots.pinned.hold([victim.digest]) as held:
        span = held[victim.digest]
    entry = snapshots.pinned._entries[victim.digest]  # the tamperer reaches inside
    entry.region.host.mapping[span.start + 5] ^= 0xFF
    snapshots.materialize(snap)
    tiers = {(b.digest, b.tier) for b in verify(snapshots, snap)}
    assert tiers == {(victim.digest, "pinned"), (victim.digest, ARENA_TIER)}


def test_an_unsealed_arena_is_bad(snapshots: NodeSnapshots) -> None:
    """An arena memfd a writer could still change is reported even when its bytes are
    right today."""
    snap = make_manifest(snapshots.disk, pattern(100 * KiB, 4))
    made = snapshots.materialize(snap)
    unsealed = os.memfd_create("thaw-arena-unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(unsealed, os.pread(made.host_arena.fd, snap.host.size, 0))
    os.close(made.host_arena.fd)
    made.host_arena.fd = unsealed
    made.host_arena.name = "thaw-arena-unsealed"
    bad = verify(snapshots, snap)
    assert [(b.digest, b.tier) for b in bad] == [("", ARENA_TIER)]
    assert "thaw-arena-unsealed is not sealed" in bad[0].reason
    assert "F_SEAL_WRITE" in bad[0].reason


class _Agent:
    """What AgentService.VerifySnapshot reads of its agent."""

    def __init__(self, snapshots: NodeSnapshots) -> None:
        self.node_id = "local"
        self.snapshots = snapshots
        self.home = snapshots.shm_dir  # the service's garbage collector is made with it


async def agent_pass(snapshots: NodeSnapshots, snap: manifest_pb2.SnapshotManifest
                     ) -> list[agent_pb2.SnapshotProgress]:
    service = AgentService(_Agent(snapshots))  # type: ignore[arg-type]
    return [m async for m in service.VerifySnapshot(
        agent_pb2.SnapshotRequest(manifest=snap), None)]  # type: ignore[arg-type]


def cli_verify(monkeypatch: pytest.MonkeyPatch, messages: list[agent_pb2.SnapshotProgress]
               ) -> Any:
    """`thaw snapshot verify` on the gateway's summary of the agent's messages."""
    import thaw.ops.snapshots as cli

    summary = _Summary()
    for message in messages:
        summary.add(message)
    monkeypatch.setattr(cli, "run_pass", lambda *_args, **_kw: summary.as_dict("verify"))
    return CliRunner().invoke(cli.snapshot, ["verify", "t/f"])


def test_the_agent_pass_and_the_cli_report_a_corrupt_arena_and_a_clean_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean = NodeSnapshots(DiskTier(tmp_path / "a"), PinnedTier(8 * MiB), tmp_path / "sa")
    snap = make_manifest(clean.disk, pattern(200 * KiB, 5))
    clean.materialize(snap)
    messages = asyncio.run(agent_pass(clean, snap))
    assert messages[-1].finished and not messages[-1].error and not messages[-1].bad
    result = cli_verify(monkeypatch, messages)
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith(": ok")

    corrupt = NodeSnapshots(DiskTier(tmp_path / "b"), PinnedTier(8 * MiB), tmp_path / "sb")
    snap = make_manifest(corrupt.disk, pattern(200 * KiB, 5))
    flip_after_restore(monkeypatch, corrupt, snap.host.size, 3)
    corrupt.materialize(snap)
    messages = asyncio.run(agent_pass(corrupt, snap))
    last = messages[-1]
    assert last.finished and not last.error
    digest = host_refs(snap)[0].digest
    assert [(b.digest, b.tier) for b in last.bad] == [(digest, "arena")]
    result = cli_verify(monkeypatch, messages)
    assert result.exit_code == 3, result.output
    assert f"BAD local arena chunk {digest}: thaw-arena-" in result.output
    assert "1 bad chunk(s)" in result.output


def test_verify_does_not_hold_the_memfds_eviction_closes(snapshots: NodeSnapshots) -> None:
    """The pass reads its own duplicates of the node's descriptors and closes them."""
    snap = make_manifest(snapshots.disk, pattern(100 * KiB, 6))
    snapshots.materialize(snap)
    before = set(os.listdir("/proc/self/fd"))
    assert verify(snapshots, snap) == []
    assert set(os.listdir("/proc/self/fd")) <= before
    snapshots.evict(snap)
    assert snapshots.held_memfds(snap) == []
    assert verify(snapshots, snap) == []


# The instance's side: it receives the arena memfd over its socket, as a restore
# sends it, and tries every way to write it. Standard library only, as an instance.
WRITER = r"""
import errno, fcntl, json, mmap, os, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
_, fds, _, _ = socket.recv_fds(sock, 16, 1)
fd, size = fds[0], int(sys.argv[2])
tries = {
    "pwrite": lambda: os.pwrite(fd, b"x", 0),
    "ftruncate": lambda: os.ftruncate(fd, 0),
    "mmap_shared_write": lambda: mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                           prot=mmap.PROT_READ | mmap.PROT_WRITE),
    "reopen_and_write": lambda: os.write(os.open(f"/proc/self/fd/{fd}", os.O_RDWR), b"x"),
    "add_seals": lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0),
}
out = {"uid": os.getuid()}
for name, attempt in tries.items():
    try:
        attempt()
        out[name] = "done"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
private = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
private[0] ^= 0xFF
out["private_copy_changed"] = private[0]
print(json.dumps(out))
"""


def interpreter_for(uid: int) -> str:
    """A Python the unprivileged uid may run (this one may sit under root's home)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            subprocess.run([candidate, "-I", "-c", "pass"], user=uid, group=uid,
                           extra_groups=[], check=True, capture_output=True, cwd="/")
        except (OSError, subprocess.CalledProcessError):
            continue
        return candidate
    pytest.skip(f"no Python that uid {uid} may run")


@pytest.mark.skipif(os.geteuid() != 0, reason="running a process as another uid needs root")
def test_an_instance_with_another_uid_cannot_write_its_arena_memfd(
        snapshots: NodeSnapshots) -> None:
    python = interpreter_for(INSTANCE_UID)
    snap = make_manifest(snapshots.disk, pattern(100 * KiB, 7))
    made = snapshots.materialize(snap)
    arena = made.host_arena
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        child = subprocess.Popen(
            [python, "-I", "-c", WRITER, str(theirs.fileno()), str(arena.size)],
            pass_fds=[theirs.fileno()], user=INSTANCE_UID, group=INSTANCE_UID,
            extra_groups=[], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        theirs.close()
        socket.send_fds(ours, [b"x"], [arena.fd])
        stdout, stderr = child.communicate(timeout=60)
    finally:
        ours.close()
    assert child.returncode == 0, stderr.decode()
    seen = json.loads(stdout)
    assert seen["uid"] == INSTANCE_UID
    # Sealed: no write, no resize, no writable shared mapping. Reopening the memfd
    # through /proc gives a new file on the same sealed inode (or is refused outright).
    assert seen["pwrite"] == "EPERM" and seen["ftruncate"] == "EPERM"
    assert seen["mmap_shared_write"] == "EPERM"
    assert seen["reopen_and_write"] in ("EPERM", "EACCES")
    assert seen["add_seals"] == "EPERM"  # F_SEAL_SEAL: the seals stay as they are
    # Its private copy-on-write mapping changed only its own page.
    first = snapshots.disk.get(host_refs(snap)[0].digest)[0]
    assert seen["private_copy_changed"] == first ^ 0xFF
    assert os.pread(arena.fd, 1, 0) == bytes([first])
    assert fcntl.fcntl(arena.fd, fcntl.F_GET_SEALS) & ARENA_SEALS == ARENA_SEALS
    assert verify(snapshots, snap) == []


def test_missing_seals_names_each_one() -> None:
    fd = os.memfd_create("thaw-test", os.MFD_ALLOW_SEALING)
    try:
        assert missing_seals(fd) == ["F_SEAL_WRITE", "F_SEAL_SHRINK", "F_SEAL_GROW",
                                     "F_SEAL_SEAL"]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        assert missing_seals(fd) == ["F_SEAL_WRITE", "F_SEAL_SEAL"]
    finally:
        os.close(fd)
