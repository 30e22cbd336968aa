"""The function contract (DESIGN.md §3): thaw.toml, parsed and validated.

Every problem names the key at fault (`resources.gpu_memory`, `handler`, ...).
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any

import tomllib

from thaw.core.errors import InvalidBundle
from thaw.core.units import parse_duration, parse_size

# Names become URL path segments and directory names on nodes.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
HANDLER_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# Upload bound: bundles carry code, not weights (weights come from packages/images).
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
MAX_BUNDLE_FILES = 10_000
# `[runtime] image`: a docker reference pinned to the local image id,
# `[repository[:tag]]@sha256:<64 hex>` (docker's reference grammar, simplified). The id
# is the image's config digest as the engine reports it (`docker image inspect`), not
# a registry manifest digest: nothing is ever pulled (DESIGN.md §7).
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_DOMAIN = r"(?:[A-Za-z0-9][A-Za-z0-9.-]*(?::[0-9]+)?/)?"
_IMAGE_NAME = rf"{_IMAGE_DOMAIN}{_IMAGE_COMPONENT}(?:/{_IMAGE_COMPONENT})*"
IMAGE_ID_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")
IMAGE_PATTERN = re.compile(
    rf"^(?:{_IMAGE_NAME}(?::\w[\w.-]{{0,127}})?)?@(sha256:[0-9a-f]{{64}})$")
MAX_IMAGE_REFERENCE = 512
# Ceiling of a function's own request body limit: a body is held whole in the
# gateway's memory and the instance's. The gateway's max_body_bytes caps it further.
MAX_BODY_LIMIT_BYTES = 1024**3


@dataclass(frozen=True)
class Resources:
    gpu_memory: int = 0
    """Slice size in bytes; 0 = CPU-only function."""
    gpu_compute: int = 0
    """Percent of SMs (MPS), 0 = unspecified."""
    memory: int = 0
    """Host memory an instance may allocate beyond its restored state; 0 = no limit."""


@dataclass(frozen=True)
class Scaling:
    min_instances: int = 0
    max_instances: int = 4
    target_concurrency: int = 4
    max_concurrency: int = 8
    scaledown_window: float = 60.0
    timeout: float = 300.0


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = 1
    """Concurrent calls handed to the handler as one list; 1 = no batching."""
    max_batch_wait_ms: float = 0.0
    """How long the first call of a batch waits for more."""


@dataclass(frozen=True)
class Limits:
    max_body: int = 0
    """Largest request body in bytes (413 past it); 0 = the gateway's max_body_bytes,
    which also caps it."""


# `[runtime] network`: what an instance's network namespace may reach.
NETWORKS = ("none", "egress")


@dataclass(frozen=True)
class Runtime:
    image: str = ""
    """Container image the function runs in, pinned (`repo:tag@sha256:<image id>`);
    empty = the node's own environment (its base image or virtualenv)."""
    network: str = "none"
    """"none": loopback of its own only; "egress": outbound connections to the
    internet through the node (never to the node's own addresses or the platform's
    ports)."""

    @property
    def image_id(self) -> str:
        """The local image id the reference is pinned to ('' without an image)."""
        return self.image.rpartition("@")[2] if self.image else ""


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    handler: str
    resources: Resources = field(default_factory=Resources)
    scaling: Scaling = field(default_factory=Scaling)
    snapshot: bool = True
    """False: every cold start is a fresh start (setup() runs each time)."""
    batching: Batching = field(default_factory=Batching)
    limits: Limits = field(default_factory=Limits)
    runtime: Runtime = field(default_factory=Runtime)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FunctionSpec:
        return cls(
            name=data["name"],
            handler=data["handler"],
            resources=Resources(**data.get("resources", {})),
            scaling=Scaling(**data.get("scaling", {})),
            snapshot=data.get("snapshot", True),
            batching=Batching(**data.get("batching", {})),
            limits=Limits(**data.get("limits", {})),
            runtime=Runtime(**data.get("runtime", {})),
        )


def _int(table: dict[str, Any], key: str, where: str, default: int, lo: int, hi: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidBundle(f"{where}.{key} must be an integer in [{lo}, {hi}], got {value!r}",
                            field=f"{where}.{key}")
    return value


def parse_spec(text: str) -> FunctionSpec:
    """Parse and validate a thaw.toml document."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidBundle(f"thaw.toml is not valid TOML: {exc}", field="thaw.toml") from exc
    known = {"name", "handler", "resources", "scaling", "snapshot", "batching", "limits",
             "runtime"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise InvalidBundle(f"thaw.toml has unknown key {unknown[0]!r}", field=unknown[0])
    name = doc.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidBundle(
            f"name must be 1-63 lower-case letters, digits or '-', got {name!r}", field="name")
    handler = doc.get("handler")
    if not isinstance(handler, str) or not HANDLER_PATTERN.match(handler):
        raise InvalidBundle(f"handler must look like 'module:Class', got {handler!r}",
                            field="handler")

    res = doc.get("resources", {})
    if not isinstance(res, dict):
        raise InvalidBundle("resources must be a table", field="resources")
    try:
        gpu_memory = parse_size(res.get("gpu_memory", 0))
    except ValueError as exc:
        raise InvalidBundle(f"resources.gpu_memory: {exc}", field="resources.gpu_memory") from exc
    try:
        memory = parse_size(res.get("memory", 0))
    except ValueError as exc:
        raise InvalidBundle(f"resources.memory: {exc}", field="resources.memory") from exc
    unknown_res = sorted(set(res) - {"gpu_memory", "gpu_compute", "memory"})
    if unknown_res:
        raise InvalidBundle(f"resources has unknown key {unknown_res[0]!r}",
                            field=f"resources.{unknown_res[0]}")
    resources = Resources(gpu_memory=gpu_memory,
                          gpu_compute=_int(res, "gpu_compute", "resources", 0, 0, 100),
                          memory=memory)

    sc = doc.get("scaling", {})
    if not isinstance(sc, dict):
        raise InvalidBundle("scaling must be a table", field="scaling")
    durations = {}
    for key, default in (("scaledown_window", 60.0), ("timeout", 300.0)):
        try:
            durations[key] = parse_duration(sc.get(key, default))
        except ValueError as exc:
            raise InvalidBundle(f"scaling.{key}: {exc}", field=f"scaling.{key}") from exc
    if durations["timeout"] <= 0:
        raise InvalidBundle("scaling.timeout must be positive", field="scaling.timeout")
    scaling = Scaling(
        min_instances=_int(sc, "min_instances", "scaling", 0, 0, 1000),
        max_instances=_int(sc, "max_instances", "scaling", 4, 1, 1000),
        target_concurrency=_int(sc, "target_concurrency", "scaling", 4, 1, 10_000),
        max_concurrency=_int(sc, "max_concurrency", "scaling", 8, 1, 10_000),
        **durations,
    )
    if scaling.min_instances > scaling.max_instances:
        raise InvalidBundle("scaling.min_instances must not exceed scaling.max_instances",
                            field="scaling.min_instances")
    if scaling.target_concurrency > scaling.max_concurrency:
        raise InvalidBundle("scaling.target_concurrency must not exceed max_concurrency",
                            field="scaling.target_concurrency")

    snap = doc.get("snapshot", {})
    if not isinstance(snap, dict) or not isinstance(snap.get("enabled", True), bool):
        raise InvalidBundle("snapshot must be a table with a boolean 'enabled'",
                            field="snapshot.enabled")
    bt = doc.get("batching", {})
    if not isinstance(bt, dict):
        raise InvalidBundle("batching must be a table", field="batching")
    wait = bt.get("max_batch_wait_ms", 0)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 10_000:
        raise InvalidBundle(f"batching.max_batch_wait_ms must be a number in [0, 10000], "
                            f"got {wait!r}", field="batching.max_batch_wait_ms")
    batching = Batching(max_batch_size=_int(bt, "max_batch_size", "batching", 1, 1, 1024),
                        max_batch_wait_ms=float(wait))
    if batching.max_batch_size > scaling.max_concurrency:
        raise InvalidBundle("batching.max_batch_size must not exceed scaling.max_concurrency "
                            "(a batch is made of concurrent calls)",
                            field="batching.max_batch_size")
    return FunctionSpec(name=name, handler=handler, resources=resources, scaling=scaling,
                        snapshot=snap.get("enabled", True), batching=batching,
                        limits=_limits(doc.get("limits", {})),
                        runtime=_runtime(doc.get("runtime", {})))


def _limits(table: object) -> Limits:
    if not isinstance(table, dict):
        raise InvalidBundle("limits must be a table", field="limits")
    unknown = sorted(set(table) - {"max_body"})
    if unknown:
        raise InvalidBundle(f"limits.{unknown[0]} is not a known key (known: max_body)",
                            field=f"limits.{unknown[0]}")
    if "max_body" not in table:
        return Limits()
    raw = table["max_body"]
    try:
        max_body = parse_size(raw)
    except (ValueError, TypeError) as exc:
        raise InvalidBundle(f"limits.max_body: {exc}", field="limits.max_body") from exc
    if not 1 <= max_body <= MAX_BODY_LIMIT_BYTES:
        raise InvalidBundle(
            f"limits.max_body must be from 1 byte to {MAX_BODY_LIMIT_BYTES} bytes (1GiB), "
            f"got {raw!r}; leave it out for the gateway's max_body_bytes",
            field="limits.max_body")
    return Limits(max_body=max_body)


def _runtime(table: object) -> Runtime:
    if not isinstance(table, dict):
        raise InvalidBundle("runtime must be a table", field="runtime")
    unknown = sorted(set(table) - {"image", "network"})
    if unknown:
        raise InvalidBundle(f"runtime has unknown key {unknown[0]!r}",
                            field=f"runtime.{unknown[0]}")
    network = table.get("network", "none")
    if network not in NETWORKS:
        raise InvalidBundle(f"runtime.network must be one of {', '.join(NETWORKS)}, "
                            f"got {network!r}", field="runtime.network")
    image = table.get("image", "")
    if image == "":
        return Runtime(network=network)
    if (not isinstance(image, str) or len(image) > MAX_IMAGE_REFERENCE
            or not IMAGE_PATTERN.match(image)):
        raise InvalidBundle(
            f"runtime.image must be an image reference pinned to its local image id, "
            f"'repository[:tag]@sha256:<64 hex>' (`thaw deploy IMAGE` writes it), "
            f"got {image!r}", field="runtime.image")
    return Runtime(image=image, network=network)


def pin_runtime_image(text: str, image: str) -> str:
    """thaw.toml `text` with `[runtime] image = "<image>"` added (a pinned reference).

    Appending a table keeps the author's file byte for byte above it; a file that
    already names a runtime keeps it only when it names this very image (what `thaw
    deploy IMAGE` resolved), else the author must choose."""
    if not IMAGE_PATTERN.match(image):
        raise InvalidBundle(f"not a pinned image reference: {image!r}", field="runtime.image")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidBundle(f"thaw.toml is not valid TOML: {exc}", field="thaw.toml") from exc
    runtime = doc.get("runtime")
    if runtime is None:
        return text + ("" if text.endswith("\n") or not text else "\n") + (
            f'\n[runtime]\nimage = "{image}"\n')
    if isinstance(runtime, dict) and runtime.get("image") == image:
        return text
    raise InvalidBundle(
        f"thaw.toml already names a runtime ({runtime!r}); the image it is deployed from "
        f"is {image}: remove [runtime] from the image's thaw.toml", field="runtime.image")


def read_bundle(data: bytes) -> FunctionSpec:
    """Validate an uploaded bundle (a tar, optionally gzip'd) and return its spec.

    Rejects what could escape the extraction folder (absolute paths, `..`, links,
    devices) so that a node can unpack it safely.
    """
    if not data:
        raise InvalidBundle("the bundle is empty", field="bundle")
    if len(data) > MAX_BUNDLE_BYTES:
        raise InvalidBundle(f"the bundle is larger than {MAX_BUNDLE_BYTES} bytes",
                            field="bundle")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            members = tar.getmembers()
            if len(members) > MAX_BUNDLE_FILES:
                raise InvalidBundle(f"the bundle has more than {MAX_BUNDLE_FILES} files",
                                    field="bundle")
            toml_member = None
            for member in members:
                name = member.name.removeprefix("./")
                if name.startswith("/") or ".." in name.split("/"):
                    raise InvalidBundle(f"unsafe path in bundle: {member.name!r}",
                                        field="bundle")
                if not (member.isfile() or member.isdir()):
                    raise InvalidBundle(
                        f"bundle may hold only files and folders: {member.name!r}",
                        field="bundle")
                if name == "thaw.toml":
                    toml_member = member
            if toml_member is None:
                raise InvalidBundle("the bundle has no thaw.toml at its root",
                                    field="thaw.toml")
            handle = tar.extractfile(toml_member)
            assert handle is not None
            raw = handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidBundle(f"the bundle is not a readable tar archive: {exc}",
                            field="bundle") from exc
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise InvalidBundle("thaw.toml is not UTF-8", field="thaw.toml") from exc
    return parse_spec(text)


def extract_bundle(data: bytes, dest: str) -> None:
    """Unpack a bundle already accepted by read_bundle."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        tar.extractall(dest, filter="data")


def pack_bundle(folder: str) -> bytes:
    """A gzip'd tarball of a bundle folder, thaw.toml at its root (used by CLI and tests)."""
    import os

    buf = io.BytesIO()
    skip = {"__pycache__", ".git", ".venv", ".thaw"}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d not in skip)
            for fname in sorted(files):
                if fname.endswith(".pyc"):
                    continue
                path = os.path.join(root, fname)
                tar.add(path, arcname=os.path.relpath(path, folder), recursive=False)
    return buf.getvalue()
