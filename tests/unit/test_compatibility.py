"""The snapshot compatibility rules (docs/gpu.md, "Snapshot compatibility";
snapshotter/manifest.py check_fingerprint): host-memory snapshots restore anywhere;
a snapshot with a device arena needs a cuda node of the same architecture family and
a driver at least as new; Python, torch and NumPy stay exact."""

from __future__ import annotations

import pytest

from thaw.core.errors import FingerprintMismatch
from thaw.proto import manifest_pb2
from thaw.snapshotter.manifest import (
    build_manifest,
    capture_json,
    check_fingerprint,
    has_device_arena,
)
from thaw.snapshotter.runtime import SnapshotMeta

ENV = {"python": "3.11.7", "torch": "2.13.0+cu128", "numpy": "2.4.6"}
H100_570 = {**ENV, "device_type": "cuda", "gpu_model": "NVIDIA H100 80GB HBM3",
            "driver": "570.86.15", "compute_capability": "9.0"}
HOST_NODE = {**ENV, "device_type": "host", "gpu_model": "", "driver": ""}
GiB = 1024**3


def snapshot(*, device_bytes: int = 0, **fingerprint: str) -> manifest_pb2.SnapshotManifest:
    m = manifest_pb2.SnapshotManifest(
        function="t/f", version="1",
        device=manifest_pb2.Arena(size=device_bytes),
        fingerprint=manifest_pb2.Fingerprint(**{**ENV, "function_version": "1",
                                                **fingerprint}))
    if device_bytes:
        m.storages.add(index=0, arena=manifest_pb2.ARENA_DEVICE, offset=0,
                       nbytes=device_bytes, kind="torch", dtype="float16", device="cuda:0")
    return m


def taken_on_h100(**changes: str) -> manifest_pb2.SnapshotManifest:
    fp = {"device_type": "cuda", "gpu_model": "NVIDIA H100 80GB HBM3",
          "driver": "550.54.15", "compute_capability": "9.0", **changes}
    return snapshot(device_bytes=2 * GiB, **fp)


def refused(manifest: manifest_pb2.SnapshotManifest, node: dict[str, str]) -> FingerprintMismatch:
    with pytest.raises(FingerprintMismatch) as info:
        check_fingerprint(manifest, node)
    return info.value


# ---- no device arena: any node -----------------------------------------------------

def test_a_cpu_only_snapshot_restores_on_a_cuda_node() -> None:
    # examples/embed on a CPU build: device type "host", no GPU facts.
    cpu = snapshot(device_type="host")
    assert not has_device_arena(cpu)
    check_fingerprint(cpu, H100_570)
    check_fingerprint(cpu, HOST_NODE)


def test_without_a_device_arena_gpu_and_driver_fields_do_not_matter() -> None:
    # Taken on a GPU node by a function whose state lives in host memory.
    host_state = snapshot(device_type="cuda", gpu_model="NVIDIA A100-SXM4-40GB",
                          driver="580.65.06", compute_capability="8.0")
    check_fingerprint(host_state, H100_570)
    check_fingerprint(host_state, HOST_NODE)


# ---- a device arena: same family, driver at least as new ----------------------------

def test_same_family_and_a_newer_driver_restore() -> None:
    check_fingerprint(taken_on_h100(), H100_570)
    # Another model of the family (H100 PCIe vs SXM, H200): same compute capability major.
    check_fingerprint(taken_on_h100(), {**H100_570, "gpu_model": "NVIDIA H200",
                                        "compute_capability": "9.0"})
    # The very same driver.
    check_fingerprint(taken_on_h100(driver="570.86.15"), H100_570)


def test_a_device_arena_on_a_host_node_is_refused_naming_the_device_type() -> None:
    err = refused(taken_on_h100(), HOST_NODE)
    assert err.field == "fingerprint.device_type"
    assert "CUDA memory" in err.message and "'host'" in err.message


def test_another_architecture_family_is_refused() -> None:
    a100 = {**H100_570, "gpu_model": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    err = refused(taken_on_h100(), a100)
    assert err.field == "fingerprint.compute_capability"
    assert "sm_9x (Hopper)" in err.message and "sm_8x (Ampere/Ada)" in err.message
    # Minor versions of one family are compatible: 8.0 (A100) and 8.6 (A10).
    check_fingerprint(taken_on_h100(compute_capability="8.0", gpu_model="NVIDIA A100"),
                      {**a100, "compute_capability": "8.6", "gpu_model": "NVIDIA A10"})


@pytest.mark.parametrize(("taken", "node"), [
    ("570.86.15", "550.54.15"),
    ("565.57.01", "550.127.05"),
    ("580.65.06", "570.124.06"),
    ("550.127.05", "550.54.15"),  # numerically older though "550.54" > "550.127" as text
])
def test_an_older_driver_is_refused(taken: str, node: str) -> None:
    err = refused(taken_on_h100(driver=taken), {**H100_570, "driver": node})
    assert err.field == "fingerprint.driver"
    assert taken in err.message and node in err.message


@pytest.mark.parametrize(("taken", "node"), [
    ("535.183.01", "550.54.15"), ("550.54.15", "550.127.05"), ("565.57.01", "570.86.15"),
    ("570.86.15", "580.65.06"), ("580.65.06", "580.65.06"),
])
def test_a_newer_or_equal_driver_is_accepted(taken: str, node: str) -> None:
    check_fingerprint(taken_on_h100(driver=taken), {**H100_570, "driver": node})


def test_a_driver_recorded_unreadably_is_no_proof_of_a_mismatch() -> None:
    # What the old parser recorded from the open kernel module's version line.
    check_fingerprint(taken_on_h100(driver="for"), H100_570)
    # A node whose NVML cannot say its driver.
    check_fingerprint(taken_on_h100(), {**H100_570, "driver": ""})


def test_without_a_recorded_family_only_the_same_model_is_known_to_fit() -> None:
    old = taken_on_h100(compute_capability="")
    check_fingerprint(old, H100_570)
    err = refused(old, {**H100_570, "gpu_model": "NVIDIA A100-SXM4-80GB",
                        "compute_capability": "8.0"})
    assert err.field == "fingerprint.gpu_model"
    # A node that cannot say its family is held to the model too.
    err = refused(taken_on_h100(), {**H100_570, "gpu_model": "NVIDIA L4",
                                    "compute_capability": ""})
    assert err.field == "fingerprint.gpu_model"
    check_fingerprint(taken_on_h100(), {**H100_570, "compute_capability": ""})


@pytest.mark.parametrize(("field", "value"), [
    ("python", "3.12.1"), ("torch", "2.13.0+cu126"), ("numpy", "1.26.4"),
])
def test_python_torch_and_numpy_stay_exact_with_or_without_a_device_arena(
        field: str, value: str) -> None:
    for manifest in (taken_on_h100(), snapshot(device_type="host")):
        node = {**H100_570, field: value}
        assert refused(manifest, node).field == f"fingerprint.{field}"


def test_an_empty_cuda_storage_still_needs_cuda() -> None:
    m = snapshot(device_type="cuda", gpu_model="NVIDIA H100 80GB HBM3", driver="570.86.15",
                 compute_capability="9.0")
    m.storages.add(index=0, arena=manifest_pb2.ARENA_DEVICE, offset=0, nbytes=0,
                   kind="torch", dtype="float32", device="cuda:0")
    assert has_device_arena(m)
    assert refused(m, HOST_NODE).field == "fingerprint.device_type"


# ---- the manifest carries the family; the runtime's snapshot.json stays readable ------

def test_the_family_travels_in_the_manifest_and_the_runtime_reads_the_json_back() -> None:
    capture = {"fingerprint": {**ENV, "device_type": "cuda", "gpu_model": "NVIDIA H100",
                               "driver": "570.86.15", "compute_capability": "9.0",
                               "function_version": "1"},
               "storages": [], "modules": []}
    empty = manifest_pb2.Arena()
    m = build_manifest(capture, function="t/f", version="1", pickle=empty, host=empty,
                       device=empty)
    assert m.fingerprint.compute_capability == "9.0"
    assert m.fingerprint.driver == "570.86.15"
    meta = SnapshotMeta.from_json(capture_json(m))  # what a restoring runtime does
    assert meta.fingerprint.driver == "570.86.15"
