"""What an instance tells the node agent, and what the agent asks a template.

Status events are JSON lines on an inherited file descriptor (`--status-fd`), never on
stdout/stderr: those belong to the tenant's code and go to the instance log. Each event
is one small frozen dataclass; `parse_event` turns a line back into one, so the agent
side reads the same records this side writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

# describe_exception is re-exported: every failure words its reason with it.
from .bounded import MAX_REASON_CHARS, cut
from .bounded import describe_exception as describe_exception


class ExitCode(enum.IntEnum):
    """Process exit codes of the runtime. The node agent maps them to instance states;
    keep them in sync with the agent's table (thaw.platform)."""

    OK = 0
    # argparse exits with 2 on a bad command line; we keep its meaning.
    USAGE = 2
    IMPORT_FAILED = 10
    SETUP_FAILED = 11
    CAPTURE_FAILED = 12
    RESTORE_FAILED = 13
    SERVE_FAILED = 14
    OUT_OF_MEMORY = 15
    WARMUP_FAILED = 16


class Stage(str, enum.Enum):
    """Where a start, build or restore failed (the `stage` of a `failed` event)."""

    IMPORT = "import"
    SETUP = "setup"
    # The build's warm-up (warmup.py), between setup() and the capture.
    WARMUP = "warmup"
    CAPTURE = "capture"
    RESTORE = "restore"
    # Binding the serving socket (e.g. its path is too long for AF_UNIX).
    SERVE = "serve"
    # A template could not read or act on a spawn request.
    SPAWN = "spawn"

    @property
    def exit_code(self) -> ExitCode:
        return _STAGE_EXIT_CODES[self]


_STAGE_EXIT_CODES = {
    Stage.IMPORT: ExitCode.IMPORT_FAILED,
    Stage.SETUP: ExitCode.SETUP_FAILED,
    Stage.WARMUP: ExitCode.WARMUP_FAILED,
    Stage.CAPTURE: ExitCode.CAPTURE_FAILED,
    Stage.RESTORE: ExitCode.RESTORE_FAILED,
    Stage.SERVE: ExitCode.SERVE_FAILED,
    Stage.SPAWN: ExitCode.RESTORE_FAILED,
}

Timings = dict[str, float]


# --- instance -> agent -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ready:
    """The instance is serving on its socket."""

    event: ClassVar[str] = "ready"
    pid: int
    timings: Timings
    # Only for fresh starts: the handler's input schema (signature.py), which a
    # function that is never built (`snapshot = false`) keeps from its first start;
    # "" for none.
    input_schema: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.input_schema, str):
            object.__setattr__(self, "input_schema", "")


@dataclasses.dataclass(frozen=True)
class Failed:
    """A start, build or restore failed; the process exits with `stage.exit_code`."""

    event: ClassVar[str] = "failed"
    stage: Stage
    reason: str
    # Only for capture failures: which part of the handler could not be snapshotted.
    attribute_path: str | None = None
    # Only for capture failures: the handler's input schema (signature.py), which the
    # function keeps while it runs with fresh starts; "" for none.
    input_schema: str = ""

    def __post_init__(self) -> None:
        # Bounded on both sides: what the instance sends, and what the agent reads
        # from a process that may write anything on its status descriptor.
        if isinstance(self.reason, str):
            object.__setattr__(self, "reason", cut(self.reason, MAX_REASON_CHARS))
        if isinstance(self.attribute_path, str):
            object.__setattr__(self, "attribute_path",
                               cut(self.attribute_path, MAX_REASON_CHARS))
        if not isinstance(self.input_schema, str):
            object.__setattr__(self, "input_schema", "")


@dataclasses.dataclass(frozen=True)
class Captured:
    """A build wrote its snapshot and exits 0."""

    event: ClassVar[str] = "captured"
    timings: Timings
    host_size: int
    device_size: int


@dataclasses.dataclass(frozen=True)
class TemplateReady:
    """A template imported the function's modules and listens for spawn requests.

    `fork_safe` is False when those imports initialised CUDA: a CUDA context does not
    survive fork, so such a template forks nothing and its instances must start as
    fresh interpreters that import and then restore; `unsafe_reason` says what did it.
    """

    event: ClassVar[str] = "template_ready"
    pid: int
    timings: Timings
    fork_safe: bool = True
    unsafe_reason: str = ""

    def __post_init__(self) -> None:
        # parse_event turns a TypeError into "malformed event": a string "false" must
        # not read as a fork-safe template.
        if not isinstance(self.fork_safe, bool) or not isinstance(self.unsafe_reason, str):
            raise TypeError("fork_safe must be a bool and unsafe_reason a string")


@dataclasses.dataclass(frozen=True)
class Spawned:
    """A template forked an instance (sent by the template, before the child's Ready)."""

    event: ClassVar[str] = "spawned"
    pid: int


@dataclasses.dataclass(frozen=True)
class ChildExited:
    """A template's forked instance ended (on the template's status channel): only
    the template, its parent, can learn the exit status, e.g. a SIGSEGV."""

    event: ClassVar[str] = "child_exited"
    pid: int
    returncode: int
    """Exit code, or minus the signal number that killed it (as subprocess does)."""


Event = Ready | Failed | Captured | TemplateReady | Spawned | ChildExited

_EVENT_TYPES: dict[str, type[Event]] = {
    cls.event: cls for cls in (Ready, Failed, Captured, TemplateReady, Spawned, ChildExited)
}


def event_to_line(event: Event) -> bytes:
    """One JSON line; `attribute_path` and `input_schema` are left out when they do
    not apply."""
    record: dict[str, Any] = {"event": event.event}
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)
        if (value is None and field.name == "attribute_path") or (
                value == "" and field.name == "input_schema"):
            continue
        record[field.name] = value.value if isinstance(value, enum.Enum) else value
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def parse_event(line: bytes | str) -> Event:
    """The agent side of `event_to_line`; raises ValueError on anything else."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError(f"status event is not a JSON object: {_quote(line)}")
    cls = _EVENT_TYPES.get(record.pop("event", None))
    if cls is None:
        raise ValueError(f"unknown status event: {_quote(line)}")
    if cls is Failed:
        record["stage"] = Stage(record["stage"])
    try:
        return cls(**record)
    except TypeError as exc:
        raise ValueError(f"malformed {cls.event} event: {_quote(line)}") from exc


def _quote(line: bytes | str) -> str:
    """A bad line as an error quotes it: the start only (it came from a process that
    may write anything)."""
    return repr(line[:200]) + (f"... [{len(line) - 200} more]" if len(line) > 200 else "")


class StatusChannel:
    """Writes events as whole JSON lines to a file descriptor or a connection."""

    def __init__(self, write_all: Callable[[bytes], object], fd: int | None = None) -> None:
        self._write_all = write_all
        # The descriptor this channel owns, if any (a template's child closes it).
        self.fd = fd

    @classmethod
    def for_fd(cls, fd: int) -> StatusChannel:
        """A channel owning an inherited descriptor (--status-fd)."""
        # The fd must not leak into the tenant's subprocesses: the agent reads it until
        # EOF, and a long-lived grandchild holding it open would hide our exit.
        os.set_inheritable(fd, False)
        return cls(lambda data: _write_fd(fd, data), fd)

    @classmethod
    def to_stderr(cls) -> StatusChannel:
        """Without --status-fd (running by hand), events go to stderr."""
        return cls(lambda data: _write_fd(2, data))

    def emit(self, event: Event) -> None:
        self._write_all(event_to_line(event))


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- agent -> template -------------------------------------------------------------


# Descriptors a spawn request may carry, by the name the request gives each. They travel
# as SCM_RIGHTS ancillary data with the request's line, in the order of its "fds" list:
# an instance never opens snapshot data by path.
SPAWN_FD_NAMES = ("snapshot_json", "pickle", "host_arena", "device_arena", "slice")
# The most descriptors one request may carry (every name above once).
MAX_SPAWN_FDS = len(SPAWN_FD_NAMES)
SLICE_KINDS = ("host", "cuda")


@dataclasses.dataclass(frozen=True)
class SliceDescriptor:
    """The instance's device memory, as the agent hands it over. `host`: the slice is a
    memfd that travels as the request's "slice" descriptor; `cuda`: a CUDA IPC handle
    of a device allocation, found by PCI bus id. The snapshot's device arena starts at
    `offset` in it; what lies past the arena is the function's to allocate."""

    kind: str
    size: int
    """Bytes the instance can address (a GPU slice may allocate only the arena)."""
    offset: int = 0
    pci_bus_id: str = ""
    device_index: int = 0
    ipc_handle: str = ""
    """cudaIpcMemHandle_t, hex (cuda only)."""
    limit: int = 0
    """The whole slice in bytes: what the instance's device memory may reach, the
    arena included (0: `size`)."""

    def __post_init__(self) -> None:
        if self.kind not in SLICE_KINDS:
            raise ValueError(f"slice kind must be one of {SLICE_KINDS}, got {self.kind!r}")
        for name in ("size", "offset", "device_index", "limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"slice field {name!r} must be an integer >= 0, got {value!r}")
        if self.offset > self.size:
            raise ValueError(f"slice offset {self.offset} is past its size {self.size}")
        if self.limit and self.limit < self.size:
            raise ValueError(f"slice limit {self.limit} is below its size {self.size}")
        if self.kind == "cuda" and not self.ipc_handle:
            raise ValueError("a cuda slice needs its ipc_handle")

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Any) -> SliceDescriptor:
        if not isinstance(record, dict):
            raise ValueError("spawn request field 'slice' must be an object")
        try:
            return cls(**record)
        except TypeError as exc:
            raise ValueError(f"malformed slice descriptor: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class SpawnRequest:
    """One message on a template's control socket: fork an instance and restore into it.

    `fds` maps names of SPAWN_FD_NAMES to descriptors of the sending process; on the
    wire the line names them in order ("fds") and the descriptors themselves go as
    SCM_RIGHTS with it (`to_message`, `from_message`). `socket` and `log` are the
    instance's own socket and log, never snapshot data."""

    op: ClassVar[str] = "spawn"
    instance_id: str
    socket: str
    log: str
    fds: dict[str, int] = dataclasses.field(default_factory=dict)
    slice: SliceDescriptor | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Set in the instance before it restores (before anything initialises CUDA there):
    what its slice needs, e.g. CUDA_VISIBLE_DEVICES and an MPS thread percentage, and
    the function's thaw.toml [env]."""
    secrets: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    """The function's secrets, current: set after `env`, before on_restore runs."""

    def fd(self, name: str) -> int | None:
        return self.fds.get(name)

    def to_message(self) -> tuple[bytes, list[int]]:
        """The line and the descriptors to send with it, in the line's "fds" order."""
        names = [name for name in SPAWN_FD_NAMES if name in self.fds]
        record: dict[str, Any] = {"op": self.op, "instance_id": self.instance_id,
                                  "socket": self.socket, "log": self.log, "fds": names,
                                  "slice": self.slice.to_record() if self.slice else None,
                                  "env": self.env, "secrets": self.secrets}
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        return line, [self.fds[name] for name in names]

    @classmethod
    def from_message(cls, line: bytes, fds: list[int]) -> SpawnRequest:
        """The request a line and the descriptors received with it make; ValueError
        (the caller closes `fds`) if they do not fit together."""
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"spawn request is not JSON: {exc}") from exc
        if not isinstance(record, dict) or record.pop("op", None) != cls.op:
            raise ValueError('spawn request must be a JSON object with "op": "spawn"')
        names = record.pop("fds", [])
        if (not isinstance(names, list) or len(set(names)) != len(names)
                or any(name not in SPAWN_FD_NAMES for name in names)):
            raise ValueError(f"spawn request field 'fds' must list distinct names of "
                             f"{SPAWN_FD_NAMES}, got {names!r}")
        if len(names) != len(fds):
            raise ValueError(f"spawn request names {len(names)} descriptors but "
                             f"{len(fds)} came with it")
        described = record.pop("slice", None)
        record["instance_id"] = str(record.get("instance_id", ""))
        try:
            request = cls(**record, fds=dict(zip(names, fds, strict=True)),
                          slice=SliceDescriptor.from_record(described)
                          if described is not None else None)
        except TypeError as exc:
            raise ValueError(f"malformed spawn request: {exc}") from exc
        for name in ("socket", "log"):
            if not isinstance(getattr(request, name), str):
                raise ValueError(f"spawn request field {name!r} must be a path string")
        for name in ("env", "secrets"):
            if not _str_map(getattr(request, name)):
                raise ValueError(f"spawn request field {name!r} must map names to strings")
        for name in ("snapshot_json", "pickle"):
            if name not in request.fds:
                raise ValueError(f"spawn request carries no {name!r} descriptor")
        if request.slice is not None and request.slice.kind == "host" and "slice" not in names:
            raise ValueError("a host slice must come as the 'slice' descriptor")
        return request


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """A line on a template's control socket: fork, run setup() in the child and
    capture a snapshot into `out` (a new version or copy of code the template already
    imported builds without paying for imports again)."""

    op: ClassVar[str] = "build"
    out: str
    log: str
    function_version: str = ""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """The function's thaw.toml [env], set before setup() runs."""
    secrets: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    """The function's secrets, set for setup() and removed before the capture."""

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BuildRequest:
        try:
            request = cls(**{k: v for k, v in record.items() if k != "op"})
        except TypeError as exc:
            raise ValueError(f"malformed build request: {exc}") from exc
        if not isinstance(request.out, str) or not isinstance(request.log, str):
            raise ValueError("build request fields 'out' and 'log' must be path strings")
        if not _str_map(request.env) or not _str_map(request.secrets):
            raise ValueError("build request fields 'env' and 'secrets' must map names to "
                             "strings")
        return request


def _str_map(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def receive_message(conn: Any, max_bytes: int) -> tuple[bytes, list[int]]:
    """One line from a unix socket and the descriptors that came with it (SCM_RIGHTS),
    made non-inheritable: the tenant's subprocesses must not get snapshot data.
    ValueError (nothing left open) past `max_bytes` or when ancillary data was cut."""
    import socket

    data = bytearray()
    fds: list[int] = []
    try:
        while b"\n" not in data:
            chunk, received, flags, _ = socket.recv_fds(conn, 65536, MAX_SPAWN_FDS)
            fds += received
            for fd in received:
                os.set_inheritable(fd, False)
            if flags & socket.MSG_CTRUNC:
                raise ValueError("a spawn request carried more descriptors than it may")
            if not chunk:
                break
            data += chunk
            if len(data) > max_bytes:
                raise ValueError("spawn request too long")
    except BaseException:
        close_fds(fds)
        raise
    return bytes(data.partition(b"\n")[0]), fds


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
