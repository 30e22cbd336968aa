"""The snapshot manifest (proto/manifest.proto) on the node side: built from what the
in-instance runtime captured, turned back into the runtime's snapshot.json for a
restore, and checked against the node's fingerprint (the compatibility rules of
docs/gpu.md, "Snapshot compatibility")."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from thaw.core.errors import FingerprintMismatch
from thaw.proto import manifest_pb2
from thaw.snapshotter.runtime.gpuinfo import (
    capability_major,
    driver_at_least,
    driver_version_text,
    family_name,
)
from thaw.snapshotter.runtime.signature import MAX_SCHEMA_BYTES
from thaw.snapshotter.runtime.snapshot import Fingerprint as RuntimeFingerprint

MANIFEST_FORMAT = 1
_COMPRESSION = {"none": manifest_pb2.COMPRESSION_NONE, "lz4": manifest_pb2.COMPRESSION_LZ4}
_COMPRESSION_NAME = {v: k for k, v in _COMPRESSION.items()}
_ARENA = {"host": manifest_pb2.ARENA_HOST, "device": manifest_pb2.ARENA_DEVICE}
_ARENA_NAME = {v: k for k, v in _ARENA.items()}
# Every fingerprint field a manifest carries (proto/manifest.proto Fingerprint).
FINGERPRINT_FIELDS = ("python", "torch", "numpy", "device_type", "gpu_model", "driver",
                      "compute_capability", "function_version")
# Fields that must be equal wherever the snapshot restores: the pickled object graph
# and the arenas' layouts are those of these very versions.
ENVIRONMENT_FIELDS = ("python", "torch", "numpy")
# The fields of the runtime's snapshot.json (snapshotter/runtime/snapshot.py): a
# restore's snapshot.json holds exactly these, or the runtime cannot read it.
_RUNTIME_FINGERPRINT_FIELDS = tuple(f.name for f in dataclasses.fields(RuntimeFingerprint))


def arena_message(size: int, chunks: Sequence[Any]) -> manifest_pb2.Arena:
    """chunks: blobstore ChunkRefs (digest, offset, length, stored_length, compression)."""
    return manifest_pb2.Arena(size=size, chunks=[
        manifest_pb2.Chunk(digest=c.digest, offset=c.offset, length=c.length,
                           stored_length=c.stored_length,
                           compression=_COMPRESSION[c.compression]) for c in chunks])


def chunk_dicts(arena: manifest_pb2.Arena) -> list[dict[str, Any]]:
    return [{"digest": c.digest, "offset": c.offset, "length": c.length,
             "stored_length": c.stored_length, "compression": _COMPRESSION_NAME[c.compression]}
            for c in arena.chunks]


def _bounded_schema(value: object) -> str:
    # snapshot.json is written inside the tenant's instance: a schema past what the
    # runtime writes is not carried to every gateway.
    text = value if isinstance(value, str) else ""
    return text if len(text.encode()) <= MAX_SCHEMA_BYTES else ""


def build_manifest(capture: Mapping[str, Any], *, function: str, version: str,
                   pickle: manifest_pb2.Arena, host: manifest_pb2.Arena,
                   device: manifest_pb2.Arena) -> manifest_pb2.SnapshotManifest:
    fp = capture.get("fingerprint", {})
    timings = capture.get("timings", {})
    return manifest_pb2.SnapshotManifest(
        format=MANIFEST_FORMAT, function=function, version=version,
        pickle=pickle, host=host, device=device,
        storages=[manifest_pb2.Storage(
            index=s["index"], arena=_ARENA[s["arena"]], offset=s["offset"], nbytes=s["nbytes"],
            kind=s["kind"], dtype=s.get("dtype") or "", device=s.get("device") or "")
            for s in capture.get("storages", [])],
        modules=list(capture.get("modules", [])),
        fingerprint=manifest_pb2.Fingerprint(
            **{k: str(fp.get(k) or "") for k in FINGERPRINT_FIELDS}),
        setup_seconds=float(timings.get("setup", 0.0)),
        import_seconds=float(timings.get("import", 0.0)),
        capture_seconds=float(timings.get("capture", 0.0)),
        input_schema=_bounded_schema(capture.get("input_schema")))


def capture_json(manifest: manifest_pb2.SnapshotManifest) -> dict[str, Any]:
    """The runtime's snapshot.json, rebuilt from a manifest for a restore."""
    fp = manifest.fingerprint
    return {
        "format": 1,
        "storages": [{"index": s.index, "arena": _ARENA_NAME[s.arena], "offset": s.offset,
                      "nbytes": s.nbytes, "kind": s.kind, "dtype": s.dtype or None,
                      "device": s.device or None} for s in manifest.storages],
        "modules": list(manifest.modules),
        "fingerprint": {k: getattr(fp, k) or None for k in _RUNTIME_FINGERPRINT_FIELDS},
        "host_size": manifest.host.size,
        "device_size": manifest.device.size,
        "timings": {"import": manifest.import_seconds, "setup": manifest.setup_seconds,
                    "capture": manifest.capture_seconds},
        "input_schema": manifest.input_schema,
    }


def manifest_key(manifest: manifest_pb2.SnapshotManifest) -> str:
    """A stable name for a snapshot's materialized files on a node."""
    return hashlib.sha256(manifest.SerializeToString(deterministic=True)).hexdigest()[:24]


def has_device_arena(manifest: manifest_pb2.SnapshotManifest) -> bool:
    """Does restoring the snapshot need a CUDA device: any bytes in its device arena,
    or any storage recorded there (an empty CUDA tensor still needs CUDA)?"""
    return manifest.device.size > 0 or any(
        s.arena == manifest_pb2.ARENA_DEVICE for s in manifest.storages)


def _refuse(key: str, why: str) -> FingerprintMismatch:
    return FingerprintMismatch(f"snapshot fingerprint mismatch on {key}: {why}",
                               field=f"fingerprint.{key}")


def check_fingerprint(manifest: manifest_pb2.SnapshotManifest,
                      local: Mapping[str, str]) -> None:
    """Refuse (FingerprintMismatch naming the field) a restore this node cannot run.

    - python, torch, numpy: equal, where the function imported them;
    - a snapshot without a device arena lives in host memory: its device type, GPU
      model and driver do not matter, it restores on any node;
    - one with a device arena needs a cuda node of the same architecture family
      (compute capability major; without one recorded, the same GPU model) and a
      driver at least as new as the one it was taken with (compared numerically).
    A fact this node or the snapshot cannot state is not a proven mismatch and
    passes (a snapshot taken before it was recorded, NVML that cannot say)."""
    taken = manifest.fingerprint
    for key in ENVIRONMENT_FIELDS:
        want, have = getattr(taken, key), local.get(key, "")
        # Empty: the function never imported it (e.g. no torch), so it cannot matter.
        if want and want != have:
            raise _refuse(key, f"taken with {want!r}, this node has {have or 'none'!r}")
    if not has_device_arena(manifest):
        return
    device_type = local.get("device_type", "")
    if device_type != "cuda":
        raise _refuse("device_type", f"the snapshot holds CUDA memory ({manifest.device.size} "
                      f"bytes in its device arena), this node's devices are "
                      f"{device_type or 'none'!r}")
    _check_architecture(taken, local)
    want_driver = driver_version_text(taken.driver)
    have_driver = driver_version_text(local.get("driver", ""))
    if driver_at_least(have_driver, want_driver) is False:
        raise _refuse("driver", f"taken with NVIDIA driver {want_driver}, this node has the "
                      f"older {have_driver}")


def _check_architecture(taken: manifest_pb2.Fingerprint, local: Mapping[str, str]) -> None:
    want, have = taken.compute_capability, local.get("compute_capability", "")
    want_major, have_major = capability_major(want), capability_major(have)
    if want_major is not None and have_major is not None:
        if want_major != have_major:
            raise _refuse("compute_capability", (
                f"taken on {family_name(want)} ({taken.gpu_model or 'unknown GPU'}, "
                f"compute capability {want}), this node has {family_name(have)} "
                f"({local.get('gpu_model') or 'unknown GPU'}, compute capability {have})"))
        return
    # No family to compare on one side: the same model is the same family for sure.
    model = local.get("gpu_model", "")
    if taken.gpu_model and model and taken.gpu_model != model:
        raise _refuse("gpu_model", (
            f"taken on {taken.gpu_model!r}, this node has {model!r} (and the architecture "
            f"family of {'the snapshot' if want_major is None else 'this node'} is not "
            "known, so only the same model is known to be compatible)"))


def dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True)
