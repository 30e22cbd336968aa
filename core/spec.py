"""The function contract (DESIGN.md §3): thaw.toml, validated against one schema.

The schema is the pydantic models below (`ThawToml`): the document as written, with
bounds on every value; `parse_spec` turns a valid one into the typed FunctionSpec the
platform passes around. Every problem names the key at fault (`resources.gpu_memory`,
`scaling.timeout`, ...). The JSON Schema of the models is served at
GET /v1/schema/thaw.toml and kept in docs/thaw-toml.schema.json (`python -m
thaw.core.spec` writes it). Limits that depend on the platform (the tenant's quota, the
largest node) are checked by the scheduler at deploy (scheduler/deploy_limits.py).

Bundles (the tarball around thaw.toml) are core/bundle.py; their names are re-exported
here for the callers that import them from this module.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import tomllib
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from thaw.core.bundle import (
    MAX_BUNDLE_BYTES,
    MAX_BUNDLE_FILES,
    BundleLimits,
    BundleScan,
    extract_bundle,
    pack_bundle,
    scan_bundle,
)
from thaw.core.errors import InvalidBundle
from thaw.core.http_spec import Http, HttpDoc
from thaw.core.schedule_spec import (
    MAX_SCHEDULES,
    Schedule,
    ScheduleDoc,
    as_list,
    one_or_many,
    table_key,
)
from thaw.core.units import parse_duration, parse_size

__all__ = [
    "MAX_BUNDLE_BYTES", "MAX_BUNDLE_FILES", "BundleLimits", "BundleScan", "Batching",
    "FunctionSpec", "Limits", "Resources", "Runtime", "Scaling", "ThawToml", "VolumeMount",
    "check_env_name", "check_mount_path",
    "extract_bundle", "pack_bundle", "parse_spec", "pin_runtime_image", "read_bundle",
    "scan_bundle", "thaw_toml_schema",
]

# Names become URL path segments, header values and directory names on nodes. `\Z`,
# not `$`: `$` also matches before a final newline.
NAME_REGEX = "^[a-z0-9][a-z0-9-]{0,62}$"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
HANDLER_REGEX = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
HANDLER_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")
MAX_HANDLER_LENGTH = 255
# `[runtime] image`: a docker reference pinned to the local image id,
# `[repository[:tag]]@sha256:<64 hex>` (docker's reference grammar, simplified). The id
# is the image's config digest as the engine reports it (`docker image inspect`), not
# a registry manifest digest: nothing is ever pulled (DESIGN.md §7).
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_DOMAIN = r"(?:[A-Za-z0-9][A-Za-z0-9.-]*(?::[0-9]+)?/)?"
_IMAGE_NAME = rf"{_IMAGE_DOMAIN}{_IMAGE_COMPONENT}(?:/{_IMAGE_COMPONENT})*"
IMAGE_ID_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}\Z")
IMAGE_PATTERN = re.compile(
    rf"^(?:{_IMAGE_NAME}(?::\w[\w.-]{{0,127}})?)?@(sha256:[0-9a-f]{{64}})\Z")
MAX_IMAGE_REFERENCE = 512
# Ceiling of a function's own request body limit: a body is held whole in the
# gateway's memory and the instance's. The gateway's max_body_bytes caps it further.
MAX_BODY_LIMIT_BYTES = 1024**3
# Bounds of the document alone. What a deploy may ask for beyond them depends on the
# platform (quota, largest node) and is the scheduler's check at deploy.
MAX_GPU_MEMORY_BYTES = 1024**4          # no GPU has 1 TiB; a typo, not a request
MAX_MEMORY_BYTES = 64 * 1024**4
MAX_MIN_INSTANCES = 100                 # always-on instances of one function
MAX_MAX_INSTANCES = 1000
MAX_CONCURRENCY = 10_000
MAX_TIMEOUT_SECONDS = 24 * 3600.0
MAX_SCALEDOWN_SECONDS = 30 * 24 * 3600.0
MAX_BATCH_SIZE = 1024
MAX_BATCH_WAIT_MS = 10_000.0
# Environment variables a function sets (`[env]`) or receives (`secrets`): POSIX names.
# The runtime's own (THAW_*), the dynamic loader's (LD_*) and those that decide which
# interpreter and packages run are the platform's.
ENV_NAME_REGEX = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
RESERVED_ENV_PREFIXES = ("THAW_", "LD_")
RESERVED_ENV_NAMES = frozenset({
    "PATH", "PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONSAFEPATH",
    "PYTHONNOUSERSITE", "PYTHONEXECUTABLE", "PYTHONPLATLIBDIR", "VIRTUAL_ENV"})
MAX_ENV_ENTRIES = 64
MAX_ENV_VALUE = 4096
MAX_SECRETS = 32
MAX_VOLUMES = 8
MAX_MOUNT_PATH = 255
# Where a volume may not be mounted: the system's folders (bound read-only in the
# sandbox, the image's own in a container) and the runtime's scratch space.
RESERVED_MOUNT_ROOTS = ("/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/lib",
                        "/lib32", "/lib64", "/libx32", "/boot", "/run", "/tmp", "/var",
                        "/root", "/opt/thaw")


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
class VolumeMount:
    path: str
    """Where the volume appears in the instance, read-only (an absolute path)."""
    volume: str
    """The tenant's volume (`thaw volume create NAME`)."""


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
    secrets: tuple[str, ...] = ()
    """Names of the tenant's secrets the function receives as environment variables."""
    env: tuple[tuple[str, str], ...] = ()
    """Plain environment variables (`[env]`), as (name, value) pairs in file order."""
    volumes: tuple[VolumeMount, ...] = ()
    """Volumes mounted read-only (`[volumes]`), in file order."""
    http: Http = field(default_factory=Http)
    """Cross-origin access (`[http]`, core/http_spec.py)."""
    schedules: tuple[Schedule, ...] = ()
    """Cron schedules (`[schedule]`, core/schedule_spec.py), in file order."""

    @property
    def env_map(self) -> dict[str, str]:
        return dict(self.env)

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
            secrets=tuple(data.get("secrets", ())),
            env=tuple((str(k), str(v)) for k, v in data.get("env", ())),
            volumes=tuple(VolumeMount(**m) for m in data.get("volumes", ())),
            http=Http.from_dict(data.get("http", {})),
            schedules=tuple(Schedule.from_dict(s) for s in data.get("schedules", ())),
        )


# ---- the schema: thaw.toml as written -------------------------------------------------

_SIZE_STRING = r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtT][iI]?[bB]?|[bB])?\s*$"
_DURATION_STRING = r"^\s*[0-9]+(\.[0-9]+)?\s*(ms|s|m|min|h)?\s*$"


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"must be a size like 512MiB or a number of bytes, got {value!r}")
    return parse_size(value)


def _duration(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"must be a duration like 60s or a number of seconds, got {value!r}")
    return parse_duration(value)


def _size_schema(lo: int, hi: int, what: str) -> WithJsonSchema:
    return WithJsonSchema({
        "anyOf": [{"type": "number", "minimum": lo, "maximum": hi},
                  {"type": "string", "pattern": _SIZE_STRING}],
        "description": f"{what}: bytes, or a size like 512MiB or 2GiB "
                       f"(from {lo} to {hi} bytes)"})


def _duration_schema(lo: float, hi: float, what: str, *, exclusive: bool) -> WithJsonSchema:
    number: dict[str, Any] = {"type": "number", "maximum": hi,
                              ("exclusiveMinimum" if exclusive else "minimum"): lo}
    return WithJsonSchema({
        "anyOf": [number, {"type": "string", "pattern": _DURATION_STRING}],
        "description": f"{what}: seconds, or a duration like 500ms, 60s, 5m, 1h "
                       f"(finite, {'over' if exclusive else 'from'} {lo:g} to {hi:g} s)"})


Size = Annotated[int, BeforeValidator(_size)]
Duration = Annotated[float, BeforeValidator(_duration)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              allow_inf_nan=False)


class ResourcesDoc(_Table):
    """[resources]"""

    gpu_memory: Annotated[Size, _size_schema(0, MAX_GPU_MEMORY_BYTES, "Slice size; 0 = CPU-only")
                          ] = Field(default=0, ge=0, le=MAX_GPU_MEMORY_BYTES)
    gpu_compute: int = Field(default=0, ge=0, le=100,
                             description="Percent of SMs (MPS); 0 = unspecified")
    memory: Annotated[Size, _size_schema(
        0, MAX_MEMORY_BYTES, "Host memory beyond the restored state; 0 = no limit")
                      ] = Field(default=0, ge=0, le=MAX_MEMORY_BYTES)


class ScalingDoc(_Table):
    """[scaling]"""

    min_instances: int = Field(default=0, ge=0, le=MAX_MIN_INSTANCES,
                               description="Instances kept warm; also within the tenant's quota")
    max_instances: int = Field(default=4, ge=1, le=MAX_MAX_INSTANCES)
    target_concurrency: int = Field(default=4, ge=1, le=MAX_CONCURRENCY)
    max_concurrency: int = Field(default=8, ge=1, le=MAX_CONCURRENCY)
    scaledown_window: Annotated[Duration, _duration_schema(
        0, MAX_SCALEDOWN_SECONDS, "Idle time before an instance stops", exclusive=False)
                                ] = Field(default=60.0, ge=0, le=MAX_SCALEDOWN_SECONDS)
    timeout: Annotated[Duration, _duration_schema(
        0, MAX_TIMEOUT_SECONDS, "Per invocation, from placement", exclusive=True)
                       ] = Field(default=300.0, gt=0, le=MAX_TIMEOUT_SECONDS)


class SnapshotDoc(_Table):
    """[snapshot]"""

    enabled: bool = Field(default=True, description="False: every cold start runs setup()")
    warmup: dict[str, Any] | None = Field(
        default=None, description="An input body predict() is called with once after "
        "setup() and before the snapshot is taken (docs/warmup.md)")


class BatchingDoc(_Table):
    """[batching]"""

    max_batch_size: int = Field(default=1, ge=1, le=MAX_BATCH_SIZE)
    max_batch_wait_ms: float = Field(default=0.0, ge=0, le=MAX_BATCH_WAIT_MS)


class LimitsDoc(_Table):
    """[limits]"""

    max_body: Annotated[Size, Field(ge=1, le=MAX_BODY_LIMIT_BYTES), _size_schema(
        1, MAX_BODY_LIMIT_BYTES, "Largest request body; absent = the gateway's max_body_bytes")
                        ] | None = None


class RuntimeDoc(_Table):
    """[runtime]"""

    image: str = Field(default="", max_length=MAX_IMAGE_REFERENCE,
                       description="'repository[:tag]@sha256:<image id>' (thaw deploy IMAGE "
                                   "writes it); empty = the node's environment")
    network: Literal["none", "egress"] = "none"

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, value: object) -> object:
        if value not in NETWORKS:
            raise ValueError(f"must be one of {', '.join(NETWORKS)}, got {value!r}")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if value and not IMAGE_PATTERN.match(value):
            raise ValueError(
                "must be an image reference pinned to its local image id, "
                "'repository[:tag]@sha256:<64 hex>' (`thaw deploy IMAGE` writes it), "
                f"got {value!r}")
        return value


def check_env_name(name: str, what: str = "name") -> str:
    """`name` as an environment variable a function may have, or ValueError saying why."""
    if not ENV_NAME_PATTERN.match(name):
        raise ValueError(f"{what} must be letters, digits or '_' (not first a digit), "
                         f"1-128 characters, got {name!r}")
    if name.upper().startswith(RESERVED_ENV_PREFIXES) or name.upper() in RESERVED_ENV_NAMES:
        raise ValueError(f"{what} {name!r} is reserved for the platform")
    return name


def check_mount_path(path: str) -> str:
    """`path` as a volume's mount point, or ValueError saying why."""
    if not path.startswith("/") or len(path) > MAX_MOUNT_PATH or "\0" in path:
        raise ValueError(f"must be an absolute path of at most {MAX_MOUNT_PATH} "
                         f"characters, got {path!r}")
    parts = path.split("/")[1:]
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"must be a plain absolute path (no '.', '..', '//' or trailing "
                         f"'/'), got {path!r}")
    for root in RESERVED_MOUNT_ROOTS:
        if path == root or path.startswith(root + "/"):
            raise ValueError(f"{path!r} is under {root}, which is the system's")
    return path


class ThawToml(_Table):
    """A function's thaw.toml (DESIGN.md §3)."""

    model_config = ConfigDict(title="thaw.toml")

    name: str = Field(pattern=NAME_REGEX, description="1-63 lower-case letters, digits or '-'")
    handler: str = Field(pattern=HANDLER_REGEX, max_length=MAX_HANDLER_LENGTH,
                         description="module:Class")
    resources: ResourcesDoc = ResourcesDoc()
    scaling: ScalingDoc = ScalingDoc()
    snapshot: SnapshotDoc = SnapshotDoc()
    batching: BatchingDoc = BatchingDoc()
    limits: LimitsDoc = LimitsDoc()
    runtime: RuntimeDoc = RuntimeDoc()
    http: HttpDoc = HttpDoc()
    schedule: list[ScheduleDoc] = Field(
        default_factory=list, max_length=MAX_SCHEDULES, json_schema_extra=one_or_many,
        description="Cron schedules: one [schedule] table, or several [[schedule]]")
    secrets: list[str] = Field(
        default_factory=list, max_length=MAX_SECRETS,
        description="Names of the tenant's secrets (`thaw secret set NAME`) the function "
                    "receives as environment variables of the same names")
    env: dict[str, Annotated[str, Field(max_length=MAX_ENV_VALUE)]] = Field(
        default_factory=dict, max_length=MAX_ENV_ENTRIES,
        description="Plain environment variables; THAW_*, LD_*, PATH and the variables "
                    "that choose Python's interpreter and packages are the platform's")
    volumes: dict[str, str] = Field(
        default_factory=dict, max_length=MAX_VOLUMES,
        description='Volumes mounted read-only: "/mount/path" = "volume-name" '
                    "(`thaw volume create`); not under the system's folders")

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, value: object) -> object:
        return as_list(value)

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, value: list[str]) -> list[str]:
        for name in value:
            check_env_name(name, "a secret's name")
        if len(set(value)) != len(value):
            raise ValueError("names a secret twice")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            check_env_name(name, "a variable's name")
            if "\0" in text:
                raise ValueError(f"the value of {name} holds a NUL character")
        return value

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: dict[str, str]) -> dict[str, str]:
        for path, volume in value.items():
            check_mount_path(path)
            if not NAME_PATTERN.match(volume):
                raise ValueError(f"the volume at {path} must be named with 1-63 lower-case "
                                 f"letters, digits or '-', got {volume!r}")
        paths = sorted(value)
        for first, second in zip(paths, paths[1:], strict=False):
            if second.startswith(first + "/"):
                raise ValueError(f"mounts {second} inside {first}")
        return value


def _problem(error: Any) -> InvalidBundle:
    """The first validation error as an InvalidBundle naming its key."""
    key = ".".join(str(part) for part in error["loc"]) or "thaw.toml"
    kind = error["type"]
    if kind == "value_error":
        detail = str(error["ctx"]["error"])
    elif kind == "missing":
        detail = "is required"
    elif kind == "extra_forbidden":
        return InvalidBundle(f"thaw.toml has unknown key {key!r}", field=key)
    elif kind == "string_pattern_mismatch" and key == "name":
        detail = "must be 1-63 lower-case letters, digits or '-'"
    elif kind == "string_pattern_mismatch" and key == "handler":
        detail = "must look like 'module:Class'"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        detail = "must be a table"
    else:
        detail = str(error["msg"]).replace("Input should be", "must be")
    shown = error.get("input")
    said = kind == "missing" or f"{shown!r}" in detail or (
        kind == "value_error" and "got " in detail)
    got = "" if said else f", got {shown!r}"
    joint = " " if detail.startswith(("must", "is ")) else ": "
    return InvalidBundle(f"{key}{joint}{detail}{got}", field=key)


def parse_spec(text: str) -> FunctionSpec:
    """Validate a thaw.toml document against the schema and return its FunctionSpec."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidBundle(f"thaw.toml is not valid TOML: {exc}", field="thaw.toml") from exc
    except RecursionError as exc:  # tomllib recurses once per nested array or table
        raise InvalidBundle("thaw.toml nests arrays or tables too deeply",
                            field="thaw.toml") from exc
    try:
        valid = ThawToml.model_validate(doc)
    except ValidationError as exc:
        raise table_key(_problem(exc.errors()[0]), doc) from exc
    sc, bt = valid.scaling, valid.batching
    if sc.min_instances > sc.max_instances:
        raise InvalidBundle("scaling.min_instances must not exceed scaling.max_instances",
                            field="scaling.min_instances")
    if sc.target_concurrency > sc.max_concurrency:
        raise InvalidBundle("scaling.target_concurrency must not exceed max_concurrency",
                            field="scaling.target_concurrency")
    if bt.max_batch_size > sc.max_concurrency:
        raise InvalidBundle("batching.max_batch_size must not exceed scaling.max_concurrency "
                            "(a batch is made of concurrent calls)",
                            field="batching.max_batch_size")
    both = set(valid.secrets) & set(valid.env)
    if both:
        raise InvalidBundle(f"env sets {sorted(both)[0]}, which is also a secret's name",
                            field=f"env.{sorted(both)[0]}")
    res = valid.resources
    return FunctionSpec(
        name=valid.name, handler=valid.handler,
        resources=Resources(gpu_memory=res.gpu_memory, gpu_compute=res.gpu_compute,
                            memory=res.memory),
        scaling=Scaling(min_instances=sc.min_instances, max_instances=sc.max_instances,
                        target_concurrency=sc.target_concurrency,
                        max_concurrency=sc.max_concurrency,
                        scaledown_window=sc.scaledown_window, timeout=sc.timeout),
        snapshot=valid.snapshot.enabled,
        batching=Batching(max_batch_size=bt.max_batch_size,
                          max_batch_wait_ms=float(bt.max_batch_wait_ms)),
        limits=Limits(max_body=valid.limits.max_body or 0),
        runtime=Runtime(image=valid.runtime.image, network=valid.runtime.network),
        secrets=tuple(valid.secrets), env=tuple(valid.env.items()),
        volumes=tuple(VolumeMount(path, volume) for path, volume in valid.volumes.items()),
        http=valid.http.spec(), schedules=tuple(s.spec() for s in valid.schedule))


def thaw_toml_schema() -> dict[str, Any]:
    """The JSON Schema of thaw.toml (served at GET /v1/schema/thaw.toml)."""
    schema = ThawToml.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = (
        "A thaw function's thaw.toml. Also checked at deploy: min_instances within the "
        "tenant's quota, gpu_memory and memory within the largest node; "
        "min_instances <= max_instances, target_concurrency <= max_concurrency, "
        "max_batch_size <= max_concurrency.")
    return schema


def schema_text() -> str:
    """The schema as docs/thaw-toml.schema.json holds it."""
    return json.dumps(thaw_toml_schema(), indent=2, sort_keys=True) + "\n"


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


def read_bundle(data: bytes, limits: BundleLimits | None = None) -> FunctionSpec:
    """Validate an uploaded bundle (core/bundle.py's limits, read as a stream) and
    return the spec of its thaw.toml."""
    scan = scan_bundle(data, limits or BundleLimits())
    return spec_of(scan)


def spec_of(scan: BundleScan) -> FunctionSpec:
    try:
        text = scan.toml.decode()
    except UnicodeDecodeError as exc:
        raise InvalidBundle("thaw.toml is not UTF-8", field="thaw.toml") from exc
    return parse_spec(text)


if __name__ == "__main__":
    sys.stdout.write(schema_text())
