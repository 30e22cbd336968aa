"""The snapshot manifest (proto/manifest.proto) on the node side: built from what the
in-instance runtime captured, turned back into the runtime's snapshot.json for a
restore, and checked against the node's fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from thaw.core.errors import FingerprintMismatch
from thaw.proto import manifest_pb2

MANIFEST_FORMAT = 1
_COMPRESSION = {"none": manifest_pb2.COMPRESSION_NONE, "lz4": manifest_pb2.COMPRESSION_LZ4}
_COMPRESSION_NAME = {v: k for k, v in _COMPRESSION.items()}
_ARENA = {"host": manifest_pb2.ARENA_HOST, "device": manifest_pb2.ARENA_DEVICE}
_ARENA_NAME = {v: k for k, v in _ARENA.items()}
# Fingerprint fields that must match for a restore to be allowed.
FINGERPRINT_FIELDS = ("python", "torch", "numpy", "device_type", "gpu_model", "driver",
                      "function_version")


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
        capture_seconds=float(timings.get("capture", 0.0)))


def capture_json(manifest: manifest_pb2.SnapshotManifest) -> dict[str, Any]:
    """The runtime's snapshot.json, rebuilt from a manifest for a restore."""
    fp = manifest.fingerprint
    return {
        "format": 1,
        "storages": [{"index": s.index, "arena": _ARENA_NAME[s.arena], "offset": s.offset,
                      "nbytes": s.nbytes, "kind": s.kind, "dtype": s.dtype or None,
                      "device": s.device or None} for s in manifest.storages],
        "modules": list(manifest.modules),
        "fingerprint": {k: getattr(fp, k) or None for k in FINGERPRINT_FIELDS},
        "host_size": manifest.host.size,
        "device_size": manifest.device.size,
        "timings": {"import": manifest.import_seconds, "setup": manifest.setup_seconds,
                    "capture": manifest.capture_seconds},
    }


def manifest_key(manifest: manifest_pb2.SnapshotManifest) -> str:
    """A stable name for a snapshot's materialized files on a node."""
    return hashlib.sha256(manifest.SerializeToString(deterministic=True)).hexdigest()[:24]


def check_fingerprint(manifest: manifest_pb2.SnapshotManifest,
                      local: Mapping[str, str]) -> None:
    """Refuse a restore where the snapshot's environment differs from this node's."""
    taken = manifest.fingerprint
    for key in FINGERPRINT_FIELDS:
        if key == "function_version":
            continue  # checked by the caller against the function it starts
        want, have = getattr(taken, key), local.get(key, "")
        # Empty: the function never imported it (e.g. no torch), so it cannot matter.
        if want and want != have:
            raise FingerprintMismatch(
                f"snapshot fingerprint mismatch on {key}: taken with {want or 'none'!r}, "
                f"this node has {have or 'none'!r}", field=f"fingerprint.{key}")


def dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True)
