"""Snapshot manifests: a restore on a mismatching fingerprint is refused."""

import pytest

from thaw.core.errors import FingerprintMismatch
from thaw.proto import manifest_pb2
from thaw.snapshotter.manifest import capture_json, check_fingerprint, manifest_key

LOCAL = {"python": "3.11.7", "torch": "2.13.0+cpu", "numpy": "2.4.6", "device_type": "host",
         "gpu_model": "", "driver": ""}


def manifest(**fingerprint: str) -> manifest_pb2.SnapshotManifest:
    return manifest_pb2.SnapshotManifest(
        function="t/f", version="1",
        fingerprint=manifest_pb2.Fingerprint(**{**LOCAL, "function_version": "1",
                                                **fingerprint}))


def test_same_environment_is_accepted() -> None:
    check_fingerprint(manifest(), LOCAL)
    # A function that never imported torch does not care which torch the node has.
    check_fingerprint(manifest(torch=""), {**LOCAL, "torch": "2.14.1"})


@pytest.mark.parametrize(("field", "value"), [
    ("python", "3.12.1"), ("torch", "2.14.1"), ("numpy", "1.26.4"),
])
def test_mismatch_is_refused_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(FingerprintMismatch) as info:
        check_fingerprint(manifest(**{field: value}), LOCAL)
    assert info.value.field == f"fingerprint.{field}"


@pytest.mark.parametrize(("field", "value"), [
    ("device_type", "cuda"), ("gpu_model", "NVIDIA H100"), ("driver", "550.54"),
])
def test_device_fields_of_a_snapshot_without_a_device_arena_do_not_matter(
        field: str, value: str) -> None:
    # It lives in host memory: any node restores it (tests/unit/test_compatibility.py
    # has the rules for snapshots that hold CUDA memory).
    check_fingerprint(manifest(**{field: value}), LOCAL)


def test_manifest_round_trips_to_the_runtime_format() -> None:
    m = manifest(torch="")
    m.storages.add(index=0, arena=manifest_pb2.ARENA_HOST, offset=4096, nbytes=64,
                   kind="torch", dtype="torch.float32", device="cpu")
    data = capture_json(m)
    assert data["fingerprint"]["torch"] is None
    assert data["storages"][0]["offset"] == 4096 and data["storages"][0]["arena"] == "host"
    assert manifest_key(m) == manifest_key(manifest_pb2.SnapshotManifest.FromString(
        m.SerializeToString()))
