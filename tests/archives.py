"""`docker save` archives made in memory for tests: docker's layout (manifest.json,
config as `<hex>.json` or `blobs/sha256/<hex>`) and the OCI layout (index.json, an
image manifest, maybe behind a nested index), plain or gzip'd, each layer a tar of
files (with whiteouts when asked)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path


def tar_of(files: dict[str, bytes | None], *, gz: bool = False) -> bytes:
    """A tar with these members: bytes are files, None a folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if gz else raw


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_of(labels: dict[str, str] | None = None, layers: int = 1) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Labels": labels or {}, "Cmd": ["python3"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{'0' * 64}"] * layers},
    }, sort_keys=True).encode()


def docker_archive(layers: list[bytes], *, labels: dict[str, str] | None = None,
                   tags: tuple[str, ...] = ("tenant/app:v1",), blobs: bool = False,
                   config: bytes | None = None, config_digest: str | None = None,
                   images: int = 1) -> tuple[bytes, str]:
    """docker's layout; returns (the archive, the image id). `config` replaces the
    config's bytes and `config_digest` the digest the manifest names (tampering)."""
    config = config if config is not None else config_of(labels, len(layers))
    digest = config_digest or sha(config)
    members: dict[str, bytes | None] = {}
    layer_names = []
    for layer in layers:
        name = f"blobs/sha256/{sha(layer)}" if blobs else f"{sha(layer)}/layer.tar"
        members[name] = layer
        layer_names.append(name)
    config_name = f"blobs/sha256/{digest}" if blobs else f"{digest}.json"
    members[config_name] = config
    entry = {"Config": config_name, "RepoTags": list(tags), "Layers": layer_names}
    members["manifest.json"] = json.dumps([entry] * images).encode()
    return tar_of(members), f"sha256:{digest}"


def oci_archive(layers: list[bytes], *, labels: dict[str, str] | None = None,
                name: str = "tenant/app:v1", nested: bool = False) -> tuple[bytes, str]:
    """The OCI layout (no manifest.json); layers stored gzip'd as OCI allows."""
    config = config_of(labels, len(layers))
    members: dict[str, bytes | None] = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
                                        f"blobs/sha256/{sha(config)}": config}
    descriptors = []
    for layer in layers:
        packed = gzip.compress(layer, mtime=0)
        members[f"blobs/sha256/{sha(packed)}"] = packed
        descriptors.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": f"sha256:{sha(packed)}", "size": len(packed)})
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": f"sha256:{sha(config)}", "size": len(config)},
        "layers": descriptors}).encode()
    members[f"blobs/sha256/{sha(manifest)}"] = manifest
    top = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
           "digest": f"sha256:{sha(manifest)}", "size": len(manifest)}
    if nested:
        inner = json.dumps({"schemaVersion": 2, "manifests": [top]}).encode()
        members[f"blobs/sha256/{sha(inner)}"] = inner
        top = {"mediaType": "application/vnd.oci.image.index.v1+json",
               "digest": f"sha256:{sha(inner)}", "size": len(inner)}
    top["annotations"] = {"io.containerd.image.name": name}
    members["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [top]}).encode()
    return tar_of(members), f"sha256:{sha(config)}"


def bundle_layer(folder: str = "app", toml: str = 'name = "arc"\nhandler = "app:Echo"\n',
                 app: str = "class Echo:\n    def __call__(self, request):\n"
                            "        return request\n") -> bytes:
    return tar_of({folder: None, f"{folder}/thaw.toml": toml.encode(),
                   f"{folder}/app.py": app.encode()})


def write(path: Path, data: bytes, *, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path
