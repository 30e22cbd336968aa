"""Chunks per tenant (scheduler/blobs.py) and volumes over them (scheduler/volumes.py):
the missing set is per tenant, a chunk is checked against its digest, storage is
bounded by the tenant's quota, manifests are canonical and refuse unsafe paths, and a
mounted volume cannot be removed."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any, cast

import pytest

from thaw.core.bundle import MAX_BUNDLE_BYTES
from thaw.core.errors import (
    AlreadyExists,
    BundleTooLarge,
    InsufficientStorage,
    InvalidArgument,
    NotFound,
)
from thaw.core.spec import parse_spec
from thaw.proto import agent_pb2, volumes_pb2
from thaw.scheduler.blobs import (
    DEFAULT_MAX_STORAGE_BYTES,
    Blobs,
    ChunkDisk,
    check_bundle_size,
)
from thaw.scheduler.states import FunctionState
from thaw.scheduler.store import Store
from thaw.scheduler.tenancy import create_tenant
from thaw.scheduler.versions import VersionStore
from thaw.scheduler.volumes import (
    VolumeFile,
    Volumes,
    canonical,
    check_file_path,
    check_mounts,
    fill_mounts,
)
from thaw.scheduler.volumes_service import VolumesService


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def blobs(store: Store, tmp_path: Path) -> Blobs:
    return Blobs(store, ChunkDisk(tmp_path / "blobs"))


@pytest.fixture
def volumes(store: Store, blobs: Blobs) -> Volumes:
    return Volumes(store, blobs)


def test_missing_is_answered_per_tenant(blobs: Blobs) -> None:
    a, b = b"chunk a" * 100, b"chunk b" * 100
    assert blobs.missing("acme", [sha(a), sha(b)]) == [sha(a), sha(b)]
    assert blobs.put("acme", sha(a), a) == (True, len(a))
    assert blobs.missing("acme", [sha(a), sha(b), sha(a)]) == [sha(b)]
    # Another tenant learns nothing of acme's chunks: it lacks them all.
    assert blobs.missing("other", [sha(a)]) == [sha(a)]
    assert blobs.put("other", sha(a), a) == (True, len(a))
    assert blobs.put("acme", sha(a), a) == (False, len(a))  # stored once per tenant
    assert blobs.read("acme", sha(a)) == a
    with pytest.raises(NotFound):
        blobs.read("acme", sha(b))


def test_a_chunk_must_match_its_digest(blobs: Blobs) -> None:
    with pytest.raises(InvalidArgument) as err:
        blobs.put("acme", sha(b"right"), b"wrong")
    assert err.value.field == "digest" and "sha256" in err.value.message
    with pytest.raises(InvalidArgument) as err:
        blobs.missing("acme", ["../../etc/passwd"])
    assert err.value.field == "digests"
    assert blobs.usage("acme").stored_bytes == 0


def test_a_damaged_chunk_on_disk_is_not_served(blobs: Blobs) -> None:
    data = b"x" * 1000
    blobs.put("acme", sha(data), data)
    blobs.disk.path("acme", sha(data)).write_bytes(b"y" * 1000)
    with pytest.raises(NotFound, match="damaged"):
        blobs.read("acme", sha(data))


def test_storage_is_bounded_by_the_tenant_quota(blobs: Blobs, store: Store) -> None:
    assert blobs.usage("acme").max_storage_bytes == DEFAULT_MAX_STORAGE_BYTES
    with pytest.raises(NotFound):
        blobs.set_quota("acme", 1500, None)
    create_tenant(store, "acme")
    blobs.set_quota("acme", 1500, None)
    first, second = b"1" * 1000, b"2" * 1000
    blobs.put("acme", sha(first), first)
    with pytest.raises(InsufficientStorage) as err:
        blobs.put("acme", sha(second), second)
    assert err.value.field == "max_storage_bytes" and "max_storage_bytes" in err.value.message
    assert blobs.missing("acme", [sha(second)]) == [sha(second)]
    assert blobs.put("acme", sha(first), first)[0] is False  # held already: no charge
    blobs.set_quota("acme", None, None)
    assert blobs.put("acme", sha(second), second) == (True, 2000)
    # max_bundle_bytes bounds every deploy of the tenant, in one request or chunks.
    check_bundle_size(store, "acme", MAX_BUNDLE_BYTES)
    blobs.set_quota("acme", None, 10_000)
    with pytest.raises(BundleTooLarge, match="max_bundle_bytes"):
        check_bundle_size(store, "acme", 10_001)
    blobs.set_quota("acme", None, None)
    with pytest.raises(InvalidArgument):
        blobs.set_quota("acme", 0, None)


def _upload(blobs: Blobs, tenant: str, data: bytes, size: int = 1000) -> VolumeFile:
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    for chunk in chunks:
        blobs.put(tenant, sha(chunk), chunk)
    return VolumeFile("", len(data), 0o644, tuple(sha(c) for c in chunks))


def test_commit_adds_and_replaces_files_under_a_canonical_manifest(volumes: Volumes,
                                                                   blobs: Blobs) -> None:
    volumes.create("acme", "weights")
    with pytest.raises(AlreadyExists):
        volumes.create("acme", "weights")
    one = _upload(blobs, "acme", b"a" * 2500)
    two = _upload(blobs, "acme", b"b" * 10)
    made = volumes.commit("acme", "weights", [
        VolumeFile("model/a.bin", one.size, 0o644, one.chunks),
        VolumeFile("config.json", two.size, 0o600, two.chunks)])
    assert (made.files, made.size) == (2, 2510)
    files = volumes.manifest("acme", made.manifest_digest)
    assert [f.path for f in files] == ["config.json", "model/a.bin"]
    # The digest is the manifest's canonical JSON, whatever order the files came in.
    assert made.manifest_digest == sha(canonical(reversed(files)))
    assert json.loads(canonical(files))["files"][1]["chunks"] == list(one.chunks)
    three = _upload(blobs, "acme", b"c" * 5)
    again = volumes.commit("acme", "weights", [VolumeFile("config.json", 5, 0o644,
                                                          three.chunks)])
    assert (again.files, again.size) == (2, 2505)
    assert again.manifest_digest != made.manifest_digest
    # The earlier manifest stays readable by its digest (instances started with it).
    assert len(volumes.manifest("acme", made.manifest_digest)) == 2


def test_commit_refuses_what_the_chunks_do_not_hold(volumes: Volumes, blobs: Blobs) -> None:
    volumes.create("acme", "w")
    one = _upload(blobs, "acme", b"a" * 100)
    with pytest.raises(InvalidArgument, match="never uploaded"):
        volumes.commit("acme", "w", [VolumeFile("x", 100, 0o644, (sha(b"nope"),))])
    with pytest.raises(InvalidArgument) as err:
        volumes.commit("acme", "w", [VolumeFile("x", 99, 0o644, one.chunks)])
    assert err.value.field == "files.size"
    # Another tenant's chunks are not this tenant's.
    volumes.create("other", "w")
    with pytest.raises(InvalidArgument, match="never uploaded"):
        volumes.commit("other", "w", [VolumeFile("x", 100, 0o644, one.chunks)])
    with pytest.raises(InvalidArgument, match="file and a folder"):
        volumes.commit("acme", "w", [VolumeFile("a", 100, 0o644, one.chunks),
                                     VolumeFile("a/b", 100, 0o644, one.chunks)])
    with pytest.raises(NotFound):
        volumes.commit("acme", "missing", [])


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../b", "a//b",
                                  "./a", "a/.", "", "a\0b", "a\\..\\b", "x/" * 600 + "y"])
def test_unsafe_file_names_are_refused(path: str, volumes: Volumes, blobs: Blobs) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_file_path(path)
    assert err.value.field == "files.path"
    volumes.create("acme", "v")
    one = _upload(blobs, "acme", b"z")
    with pytest.raises(InvalidArgument):
        volumes.commit("acme", "v", [VolumeFile(path, 1, 0o644, one.chunks)])


def _spec(volume: str) -> str:
    return (f'name = "reader"\nhandler = "app:Reader"\n'
            f'[volumes]\n"/models" = "{volume}"\n')


def test_mounts_are_checked_filled_and_keep_a_volume(store: Store, volumes: Volumes,
                                                     blobs: Blobs) -> None:
    spec = parse_spec(_spec("weights"))
    with pytest.raises(InvalidArgument) as err:
        check_mounts(store, "acme", spec)
    assert err.value.field == "volumes" and "weights" in err.value.message
    volumes.create("acme", "weights")
    check_mounts(store, "acme", spec)
    one = _upload(blobs, "acme", b"w" * 10)
    made = volumes.commit("acme", "weights", [VolumeFile("w.bin", 10, 0o644, one.chunks)])
    message = agent_pb2.FunctionSpec(tenant="acme", name="reader", volumes=[
        agent_pb2.VolumeMount(path="/models", name="weights")])
    filled = asyncio.run(fill_mounts(store, message))
    assert filled.volumes[0].manifest_digest == made.manifest_digest

    versions = VersionStore(store)
    versions.deploy("acme", spec, "0" * 64, "fresh", False)
    with pytest.raises(AlreadyExists) as err:
        volumes.delete("acme", "weights")
    assert err.value.field == "volume" and "reader" in err.value.message
    fn = store.get_function("acme", "reader")
    store.set_function_state(fn.id, fn.version, FunctionState.DELETED, "deleted")
    # A version building now counts too, while the serving one mounts nothing.
    plain = parse_spec('name = "later"\nhandler = "app:Reader"\n')
    versions.deploy("acme", plain, "1" * 64, "fresh", False)
    versions.deploy("acme", parse_spec(_spec("weights").replace("reader", "later")),
                    "2" * 64, "restore", True)
    with pytest.raises(AlreadyExists, match="later"):
        volumes.delete("acme", "weights")
    later = store.get_function("acme", "later")
    store.set_function_state(later.id, later.version, FunctionState.DELETED, "deleted")
    volumes.delete("acme", "weights")
    with pytest.raises(NotFound):
        volumes.get("acme", "weights")


def test_a_chunked_bundle_is_reassembled_within_the_tenant_quota(
        store: Store, blobs: Blobs, volumes: Volumes) -> None:
    service = VolumesService(blobs, volumes, cast(Any, None))
    parts = [b"p" * 1000, b"q" * 10]
    for part in parts:
        blobs.put("acme", sha(part), part)
    whole = b"".join(parts)

    def request(**fields: Any) -> volumes_pb2.CreateFunctionFromBlobsRequest:
        base: dict[str, Any] = {"tenant": "acme", "chunks": [sha(p) for p in parts],
                                "sha256": sha(whole), "size": len(whole)}
        return volumes_pb2.CreateFunctionFromBlobsRequest(**{**base, **fields})

    assert service.reassemble(request()) == whole
    with pytest.raises(InvalidArgument) as err:
        service.reassemble(request(sha256=sha(b"other")))
    assert err.value.field == "sha256"
    with pytest.raises(InvalidArgument):
        service.reassemble(request(chunks=[sha(parts[1]), sha(parts[0])]))
    with pytest.raises(NotFound):
        service.reassemble(request(tenant="other"))
    with pytest.raises(BundleTooLarge, match="max_bundle_bytes"):
        service.reassemble(request(size=MAX_BUNDLE_BYTES + 1))


def test_chunks_no_manifest_names_are_collected_past_the_grace(
        volumes: Volumes, blobs: Blobs) -> None:
    volumes.create("acme", "w")
    old = _upload(blobs, "acme", b"o" * 1500)
    first = volumes.commit("acme", "w", [VolumeFile("f", 1500, 0o644, old.chunks)])
    new = _upload(blobs, "acme", b"n" * 700)
    pending = _upload(blobs, "acme", b"p" * 10)  # sent, not committed yet
    volumes.commit("acme", "w", [VolumeFile("f", 700, 0o644, new.chunks)])
    # Within the grace nothing goes: the replaced file's chunks, the old manifest and
    # the upload in progress stay.
    assert blobs.missing("acme", [*old.chunks, *pending.chunks,
                                  first.manifest_digest]) == []
    first_manifest = len(canonical(volumes.manifest("acme", first.manifest_digest)))
    assert volumes.collect_chunks("acme", grace=-1) == 1500 + 10 + first_manifest
    assert blobs.missing("acme", [*old.chunks, *pending.chunks]) == [*old.chunks,
                                                                     *pending.chunks]
    current = volumes.get("acme", "w")
    assert blobs.missing("acme", [*new.chunks, current.manifest_digest]) == []
    assert [f.path for f in volumes.manifest("acme", current.manifest_digest)] == ["f"]
