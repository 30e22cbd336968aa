"""The one interface between the node agent and the things that run instances
(DESIGN.md §7): what an instance gets (`LaunchSpec`), what a runtime does with it
(`Runtime`), and what comes back (the status events of thaw.snapshotter.runtime,
plus how an instance ended).

The agent builds a `LaunchSpec` from the function's spec and hands it to whichever
runtime the node runs; each runtime turns it into its own form (a command line and
an environment for a process, a container's create arguments for docker). Nothing
else of the agent's reaches an instance, and the agent never asks which runtime it
holds: what differs between runtimes is in `RuntimeCapabilities`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, runtime_checkable

from thaw.snapshotter.runtime.events import (
    BuildRequest,
    Captured,
    ChildExited,
    ExitCode,
    Failed,
    Ready,
    SliceDescriptor,
    Spawned,
    SpawnRequest,
    Stage,
    TemplateReady,
    close_fds,
    parse_event,
)

__all__ = [
    "BuildRequest", "Captured", "ChildExited", "DeviceRequest", "Exited", "Failed",
    "InstanceEvent", "InstanceStats", "LaunchMode", "LaunchSpec", "LaunchedInstance", "PythonEnv",
    "Limits", "MemoryLimitHit", "Mount", "MountKind", "ProcessHandle", "Ready", "Runtime",
    "RuntimeCapabilities", "SandboxPolicy", "SliceDescriptor", "SliceGrant", "SnapshotFiles",
    "Spawned",
    "SpawnRequest", "Stage", "StatusEvent", "TemplateReady", "ToolRun", "describe_exit",
    "exit_event", "parse_status", "spawn_request",
]


class LaunchMode(str, enum.Enum):
    """What the in-instance runtime does once started (its first argument)."""

    FRESH = "fresh"
    BUILD = "build"
    TEMPLATE = "template"
    RESTORE = "restore"


@dataclass(frozen=True)
class Limits:
    """What an instance may use. Zero or None means the runtime's own default."""

    memory_bytes: int = 0
    """The function's `resources.memory`, beyond its restored or set-up state."""
    max_instances: int | None = None
    """Instances a template's sandbox holds (their memory counts against it)."""
    pids: int | None = None
    """Processes and threads of one sandbox."""


@dataclass(frozen=True)
class DeviceRequest:
    """The accelerators an instance's sandbox may open."""

    gpu_ids: tuple[str, ...] = ()
    """GPU UUIDs; empty: every GPU of the node (a template's instances may get
    slices on any)."""


@dataclass(frozen=True)
class SliceGrant:
    """The device slice the agent allocated for an instance before launching it."""

    id: str
    device_id: str
    size_bytes: int
    descriptor: SliceDescriptor | None = None
    """How the instance opens it (a host slice's memfd travels beside, as a descriptor)."""


@dataclass(frozen=True)
class SandboxPolicy:
    """How an instance is walled off. The docker runtime applies it to each container,
    the process runtime to each process it launches (platform/sandbox/); instances a
    template forks inherit their template's sandbox."""

    network: str = "none"
    """"none": a network of its own with only loopback (instances talk to the agent
    over unix sockets only); "egress": connected out through the node, never to its
    loopback (thaw.toml [runtime] network)."""
    read_only_rootfs: bool = True
    cap_drop: tuple[str, ...] = ("ALL",)
    no_new_privileges: bool = True
    uid: int = 0
    """The tenant's uid on this node (TenantAreas); 0: the runtime's default user."""
    gid: int = 0
    writable: tuple[str, ...] = ()
    """Host folders the instance may write (its tenant's area), at the same paths."""


@dataclass(frozen=True)
class SnapshotFiles:
    """What a template starts with of its snapshot: the snapshot.json text (its module
    list). Each runtime hands it over as a descriptor (`--snapshot-fd`), never as a path
    of the node's snapshot store; the arenas come later, as descriptors, with each spawn
    request."""

    snapshot_json: str


class MountKind(str, enum.Enum):
    """Why a host path must be visible to an instance; a runtime decides how. Snapshot
    data is never mounted: it travels as descriptors."""

    BUNDLE = "bundle"  # the function's code, read-only
    OUTPUT = "output"  # a build's snapshot folder, writable
    SOCKET = "socket"  # a unix socket the instance binds
    VOLUME = "volume"  # a materialised model volume, read-only, at its own path


@dataclass(frozen=True)
class Mount:
    """A host path an instance needs, seen at the same path inside its sandbox."""

    path: str
    kind: MountKind
    target: str = ""
    """Where the instance sees it, when not at `path` (a volume at its thaw.toml path)."""

    @property
    def read_only(self) -> bool:
        return self.kind in (MountKind.BUNDLE, MountKind.VOLUME)

    @property
    def inside(self) -> str:
        return self.target or self.path


def public_names_file() -> str:
    """The file of the `thaw` package itself (its lazy public names: `from thaw import
    Input`), which a runtime places beside the in-instance runtime it provides."""
    import thaw

    if not thaw.__file__:
        raise RuntimeError("the thaw package has no __init__.py: reinstall thaw")
    return thaw.__file__


@dataclass(frozen=True)
class PythonEnv:
    """A function's own virtualenv (platform/environments_build.py), as a launch uses
    it: the interpreter, what a sandbox binds read-only for it, and where the thaw
    runtime is (the environment holds only the function's packages)."""

    key: str
    python: str
    """The environment's interpreter (<env>/bin/python)."""
    paths: tuple[str, ...]
    """Host folders it needs, bound read-only: the environment, the Python installation
    it was made from, the runtime's folder."""
    runtime_path: str
    """A folder holding only the thaw.snapshotter.runtime package (stdlib-only), put on
    the instance's PYTHONPATH."""
    version: str = ""
    """The interpreter's version it was made with ("3.11.7")."""
    site_packages: str = ""
    """Its packages' folder: what a runtime that runs its own interpreter (docker's
    image Python) mounts and puts on PYTHONPATH instead."""
    provided: tuple[str, ...] = ()
    """Folders of packages the platform provides to it (a cog.yaml environment's cog:
    environments_provided.py), after its own packages on the path."""


@dataclass(frozen=True)
class ToolRun:
    """A node tool run to its end in a sandbox of its own (the environment builder's
    uv): no tenant code, a uid of its own, only the folders named here."""

    argv: tuple[str, ...]
    uid: int
    """Its uid and gid (ignored where the runtime does not sandbox)."""
    writable: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()
    """Besides the system's and the agent's Python folders."""
    network: str = "none"
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = ""
    timeout: float = 600.0
    max_output: int = 64 * 1024
    """Bytes of its output kept (the last ones)."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything one instance (or build, or template) is started with."""

    mode: LaunchMode
    bundle: str
    """The function's bundle folder (host path); also the working directory."""
    handler: str
    log_path: str
    """Where the instance's stdout and stderr go."""
    instance_id: str
    function: str = ""
    """tenant/name; empty for a template, which serves every function of its code."""
    version: str = ""
    """The function version a build stamps into its snapshot."""
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Secret values, added to the environment after `env`; never in a repr, a
    command line or a sandbox plan."""
    socket: str = ""
    """The unix socket a fresh or restored instance serves on."""
    control: str = ""
    """The unix socket a template takes spawn requests on."""
    out: str = ""
    """The folder a build writes its snapshot to."""
    snapshot: SnapshotFiles | None = None
    limits: Limits = Limits()
    device: DeviceRequest = DeviceRequest()
    slice: SliceGrant | None = None
    sandbox: SandboxPolicy = SandboxPolicy()
    image: str = ""
    """An image function's pinned image (`repo:tag@sha256:<id>`): it runs there."""
    cwd: str = ""
    """Working directory; empty: the bundle."""
    volumes: tuple[tuple[str, str], ...] = ()
    """(host folder, path inside) of each model volume, mounted read-only
    (platform/volumes.py)."""
    python_env: PythonEnv | None = None
    """The function's own Python environment; None: the node's base environment."""

    @property
    def workdir(self) -> str:
        return self.cwd or self.bundle

    @property
    def environment(self) -> dict[str, str]:
        return {**self.env, **self.secrets}

    def command(self) -> list[str]:
        """The in-instance runtime's arguments (after `python -m <module>`), without
        the status and snapshot descriptors, which each runtime adds its own way."""
        args = [self.mode.value]
        if self.bundle:
            args += ["--bundle", self.bundle]
        if self.handler:
            args += ["--handler", self.handler]
        if self.out:
            args += ["--out", self.out]
        if self.mode is LaunchMode.BUILD and self.version:
            args += ["--function-version", self.version]
        if self.socket:
            args += ["--socket", self.socket]
        if self.control:
            args += ["--control", self.control]
        return args

    def mounts(self) -> tuple[Mount, ...]:
        """The host paths this instance needs, each once."""
        found: list[Mount] = []
        if self.bundle:
            found.append(Mount(self.bundle, MountKind.BUNDLE))
        if self.out:
            found.append(Mount(self.out, MountKind.OUTPUT))
        found += [Mount(p, MountKind.SOCKET) for p in (self.socket, self.control) if p]
        found += [Mount(host, MountKind.VOLUME, inside) for host, inside in self.volumes]
        return tuple(found)

    @classmethod
    def from_runtime_args(cls, mode: str, args: Sequence[str], log_path: str, *,
                          cwd: str | None = None, env: Mapping[str, str] | None = None,
                          instance_id: str | None = None, memory_limit_bytes: int = 0,
                          max_instances: int | None = None,
                          gpu_device_ids: Sequence[str] = (), image: str = ""
                          ) -> LaunchSpec:
        """A spec from the runtime's own command line: the form a caller that drives
        a runtime by hand (a test, a debugging session) already has; a template's
        `--snapshot-json PATH` is read here, so the instance gets its text, never the
        path. The agent builds specs field by field."""
        options: dict[str, str] = {}
        items = list(args)
        for index, item in enumerate(items[:-1]):
            if item.startswith("--"):
                options[item] = items[index + 1]
        snapshot = None
        if "--snapshot-json" in options:
            with open(options["--snapshot-json"], encoding="utf-8") as handle:
                snapshot = SnapshotFiles(handle.read())
        return cls(
            mode=LaunchMode(mode), bundle=options.get("--bundle", ""),
            handler=options.get("--handler", ""), log_path=log_path,
            instance_id=instance_id or "", version=options.get("--function-version", ""),
            env=dict(env or {}), socket=options.get("--socket", ""),
            control=options.get("--control", ""), out=options.get("--out", ""),
            snapshot=snapshot,
            limits=Limits(memory_bytes=memory_limit_bytes, max_instances=max_instances),
            device=DeviceRequest(tuple(gpu_device_ids)), image=image, cwd=cwd or "")


# ---- events --------------------------------------------------------------------------

StatusEvent: TypeAlias = Ready | Failed | Captured | TemplateReady | Spawned | ChildExited
"""What an instance reports on its status channel (thaw.snapshotter.runtime.events)."""


@dataclass(frozen=True)
class Exited:
    """An instance's process ended."""

    reason: str
    code: int | None
    """Exit code, minus the signal number that killed it, or None when unknown."""


@dataclass(frozen=True)
class MemoryLimitHit(Exited):
    """An instance ended because it ran out of the memory it may use."""


InstanceEvent: TypeAlias = StatusEvent | Exited


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def exit_event(code: int | None) -> Exited:
    """How an ended process reads: the runtime's own out-of-memory exit is a
    `MemoryLimitHit`."""
    reason = describe_exit(code)
    if code == ExitCode.OUT_OF_MEMORY:
        return MemoryLimitHit(reason, code)
    return Exited(reason, code)


def parse_status(record: Mapping[str, Any]) -> StatusEvent | None:
    """A status record as its typed event; None for a record of another shape."""
    import json

    try:
        return parse_event(json.dumps(dict(record)))
    except ValueError:
        return None


# The fields of a spawn request given by hand (a mapping) that name files: each is
# opened here and sent as the descriptor of the same name.
SPAWN_FILE_FIELDS = ("snapshot_json", "pickle", "host_arena")


@contextlib.contextmanager
def spawn_request(request: SpawnRequest | Mapping[str, Any]) -> Iterator[SpawnRequest]:
    """A spawn request as its record. A mapping (a request written by hand: instance_id,
    socket, log and the paths of a snapshot's files) has its files opened here, and
    closed after: what the instance gets is descriptors either way."""
    if isinstance(request, SpawnRequest):
        yield request
        return
    fds: dict[str, int] = {}
    try:
        for name in SPAWN_FILE_FIELDS:
            path = request.get(name)
            if path:
                fds[name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        yield SpawnRequest(instance_id=str(request.get("instance_id", "")),
                           socket=str(request["socket"]), log=str(request["log"]), fds=fds)
    finally:
        close_fds(fds.values())


# ---- the interface -------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceStats:
    """What a runtime can tell of a running instance."""

    pid: int
    alive: bool
    rss_bytes: int = 0


@dataclass(frozen=True)
class RuntimeCapabilities:
    """What the agent must know of a runtime to use it; never its name."""

    runs_images: bool = False
    """Image functions (thaw.toml [runtime] image) can run here."""
    template_per_tenant: bool = False
    """A template's sandbox holds the instances it forks, so no two tenants may
    share one."""
    uid_per_tenant: bool = False
    """Instances run under their tenant's uid: the agent makes each tenant's writable
    folders that uid's (platform/sandbox/areas.py)."""
    python_environments: bool = False
    """Functions may run in Python environments of their own (LaunchSpec.python_env;
    platform/environments.py)."""
    environments_on_own_python: bool = False
    """Instances in an environment run this runtime's own interpreter (an image's
    python3) with the environment's packages on PYTHONPATH: restores are checked
    against that interpreter's version, not the one the environment was made with."""


class InstanceHandle(Protocol):
    """An instance as the agent holds it."""

    @property
    def pid(self) -> int: ...


@dataclass(frozen=True)
class ProcessHandle:
    """An instance known by its host pid only (one a template forked)."""

    pid: int


class LaunchedProcess(Protocol):
    """What `Runtime.launch` returns: the started process and its exit code."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


class LaunchedInstance(InstanceHandle, Protocol):
    """A launched instance and its status stream."""

    @property
    def proc(self) -> LaunchedProcess: ...

    @property
    def events(self) -> asyncio.StreamReader: ...

    async def next_event(self, timeout: float) -> dict[str, Any]: ...

    async def next_status(self, timeout: float) -> StatusEvent: ...

    async def exited(self) -> Exited: ...

    async def kill(self) -> None: ...


@runtime_checkable
class Runtime(Protocol):
    """Runs instances on this node (process.py, docker/)."""

    name: str
    """For reporting only (logs, registration)."""
    capabilities: RuntimeCapabilities

    async def launch(self, spec: LaunchSpec) -> LaunchedInstance:
        """Start the in-instance runtime as `spec` says; returns once it runs."""
        ...

    async def spawn(self, control_socket: str, request: SpawnRequest,
                    timeout: float) -> tuple[int, dict[str, Any]]:
        """Have a template fork a restored instance: (host pid, its ready event)."""
        ...

    async def build_in_template(self, control_socket: str, request: BuildRequest,
                                timeout: float) -> dict[str, Any] | None:
        """Have a template fork a build: its `captured` or `failed` event, or None
        where this runtime builds only in a sandbox of its own."""
        ...

    async def stop(self, handle: InstanceHandle, reason: str) -> None:
        """End an instance: politely, then by force."""
        ...

    def stats(self, handle: InstanceHandle) -> InstanceStats:
        """Blocking (reads /proc): call from a thread on a hot path."""
        ...

    def fingerprint(self) -> dict[str, str]:
        """What the instances' environment adds to a snapshot's fingerprint."""
        ...

    async def close(self) -> None:
        """Release everything this runtime still holds."""
        ...
