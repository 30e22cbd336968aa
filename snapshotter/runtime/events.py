"""What an instance tells the node agent, and what the agent asks a template.

Status events are JSON lines on an inherited file descriptor (`--status-fd`), never on
stdout/stderr: those belong to the tenant's code and go to the instance log. Each event
is one small frozen dataclass; `parse_event` turns a line back into one, so the agent
side reads the same records this side writes.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Callable
from typing import Any, ClassVar


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


class Stage(str, enum.Enum):
    """Where a start, build or restore failed (the `stage` of a `failed` event)."""

    IMPORT = "import"
    SETUP = "setup"
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
    Stage.CAPTURE: ExitCode.CAPTURE_FAILED,
    Stage.RESTORE: ExitCode.RESTORE_FAILED,
    Stage.SERVE: ExitCode.SERVE_FAILED,
    Stage.SPAWN: ExitCode.RESTORE_FAILED,
}

Timings = dict[str, float]


def describe_exception(exc: BaseException) -> str:
    """The `reason` form used in every failure: `<ExcType>: <message>`."""
    return f"{type(exc).__name__}: {exc}"


# --- instance -> agent -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ready:
    """The instance is serving on its socket."""

    event: ClassVar[str] = "ready"
    pid: int
    timings: Timings


@dataclasses.dataclass(frozen=True)
class Failed:
    """A start, build or restore failed; the process exits with `stage.exit_code`."""

    event: ClassVar[str] = "failed"
    stage: Stage
    reason: str
    # Only for capture failures: which part of the handler could not be snapshotted.
    attribute_path: str | None = None


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
    """One JSON line; `attribute_path` is left out when it does not apply."""
    record: dict[str, Any] = {"event": event.event}
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)
        if value is None and field.name == "attribute_path":
            continue
        record[field.name] = value.value if isinstance(value, enum.Enum) else value
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def parse_event(line: bytes | str) -> Event:
    """The agent side of `event_to_line`; raises ValueError on anything else."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError(f"status event is not a JSON object: {line!r}")
    cls = _EVENT_TYPES.get(record.pop("event", None))
    if cls is None:
        raise ValueError(f"unknown status event: {line!r}")
    if cls is Failed:
        record["stage"] = Stage(record["stage"])
    try:
        return cls(**record)
    except TypeError as exc:
        raise ValueError(f"malformed {cls.event} event: {line!r}") from exc


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


@dataclasses.dataclass(frozen=True)
class SpawnRequest:
    """One line on a template's control socket: fork an instance and restore into it."""

    op: ClassVar[str] = "spawn"
    instance_id: str
    socket: str
    pickle: str
    host_arena: str
    device_arena: str | None
    snapshot_json: str
    log: str

    @classmethod
    def from_line(cls, line: bytes) -> SpawnRequest:
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"spawn request is not JSON: {exc}") from exc
        if not isinstance(record, dict) or record.pop("op", None) != cls.op:
            raise ValueError('spawn request must be a JSON object with "op": "spawn"')
        record.setdefault("device_arena", None)
        record["instance_id"] = str(record.get("instance_id", ""))
        try:
            request = cls(**record)
        except TypeError as exc:
            raise ValueError(f"malformed spawn request: {exc}") from exc
        for name in ("socket", "pickle", "host_arena", "snapshot_json", "log"):
            if not isinstance(getattr(request, name), str):
                raise ValueError(f"spawn request field {name!r} must be a path string")
        return request

    def to_line(self) -> bytes:
        record = {"op": self.op, **dataclasses.asdict(self)}
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """A line on a template's control socket: fork, run setup() in the child and
    capture a snapshot into `out` (a new version or copy of code the template already
    imported builds without paying for imports again)."""

    op: ClassVar[str] = "build"
    out: str
    log: str
    function_version: str = ""

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BuildRequest:
        try:
            request = cls(**{k: v for k, v in record.items() if k != "op"})
        except TypeError as exc:
            raise ValueError(f"malformed build request: {exc}") from exc
        if not isinstance(request.out, str) or not isinstance(request.log, str):
            raise ValueError("build request fields 'out' and 'log' must be path strings")
        return request
