"""One container's host side: the private folders, links and FIFO it is started
with, its record while it runs, and its main process as the agent sees it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thaw.core.errors import InstanceFailed
from thaw.platform.docker.spec import SNAPSHOT_META, ContainerLayout, socket_dir
from thaw.platform.process import RuntimeProcess
from thaw.platform.runtime import LaunchSpec, MountKind
from thaw.platform.sandbox.areas import make_readable


class ContainerProcess:
    """The `proc` of a RuntimeProcess for a container: its main process's host pid,
    and its exit code once the engine has it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._done = asyncio.Event()

    def set_exit(self, code: int) -> None:
        self.returncode = code
        self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        assert self.returncode is not None
        return self.returncode


class ContainerRuntimeProcess(RuntimeProcess):
    """A RuntimeProcess whose process is a container's main process."""

    async def kill(self) -> None:
        # The main process leads its own session (runc makes it); with a private PID
        # namespace, its death takes every other process of the container with it.
        if self.proc.pid > 0:  # 0 would be our own process group
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()


@dataclass
class _Container:
    """One container this runtime started, and the host-side files that go with it."""

    name: str
    mode: str
    uid: int
    log_name: str
    private: Path
    log_dir: Path
    log_private: Path
    run_dir: Path | None = None
    run_private: Path | None = None
    # Host folders mounted read-only at their own paths.
    read_only_dirs: set[str] = field(default_factory=set)
    container: Any = None
    host_pid: int = 0
    proc: ContainerProcess | None = None
    keeper_fd: int | None = None
    # Instances forked inside (templates): pid in the container -> host pid.
    children: dict[int, int] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    removed: bool = False
    removing: asyncio.Lock = field(default_factory=asyncio.Lock)

    def visible(self, path: str) -> bool:
        """Whether the container sees the host file `path` at the same path."""
        return any(path.startswith(d.rstrip("/") + "/") for d in self.read_only_dirs)



def container_name(node_id: str, mode: str, suffix: str) -> str:
    name = f"thaw-{node_id[:20]}-{mode}-{suffix}"
    return "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in name)


def prepare_container(spec: LaunchSpec, name: str, uid: int, state_dir: Path,
                      site_packages: tuple[str, ...],
                      readable: set[str]) -> tuple[_Container, ContainerLayout]:
    """Host folders, links and the FIFO of a new container (blocking I/O). `readable`
    holds the bundles already made readable to other uids."""
    private = state_dir / name
    (private / "ctl").mkdir(parents=True)
    log_file = Path(spec.log_path)
    log_dir = log_file.parent
    log_private = log_dir / ".containers" / name
    log_private.mkdir(parents=True)
    c = _Container(name, spec.mode.value, uid, log_file.name, private, log_dir, log_private)
    fifo = private / "ctl" / "events"
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, uid, uid)
    os.chown(log_private, uid, uid)
    link_log(c, spec.log_path)
    c.read_only_dirs.update(site_packages)
    for mount in spec.mounts():
        if mount.kind is MountKind.BUNDLE:
            if mount.path not in readable:
                make_readable(Path(mount.path))
                readable.add(mount.path)
            c.read_only_dirs.add(mount.path)
        elif mount.kind is MountKind.OUTPUT:
            os.chown(mount.path, uid, uid)
    if spec.snapshot is not None:
        # The template's own copy of its snapshot.json, which its shell opens on
        # SNAPSHOT_FD: the snapshot store stays out of the container.
        meta = private / "ctl" / SNAPSHOT_META
        meta.write_text(spec.snapshot.snapshot_json, encoding="utf-8")
        os.chmod(meta, 0o444)
    try:
        sockets = socket_dir(spec)
    except ValueError as exc:
        raise InstanceFailed(str(exc)) from exc
    if sockets:
        c.run_dir = Path(sockets)
        c.run_private = private / "run"
        c.run_private.mkdir()
        os.chown(c.run_private, uid, uid)
        for path in (spec.socket, spec.control):
            if path:
                link_socket(c, path)
    layout = ContainerLayout(
        name=name, uid=uid, status_dir=str(private / "ctl"), log_dir=str(log_dir),
        log_private=str(log_private), run_dir=str(c.run_dir or ""),
        run_private=str(c.run_private or ""))
    return c, layout


def link_socket(c: _Container, path: str) -> None:
    """The agent's socket path -> where the container binds it."""
    assert c.run_dir is not None and c.run_private is not None
    if os.path.dirname(path) != str(c.run_dir):
        raise InstanceFailed(f"socket {path} is not in {c.run_dir}, the folder mounted "
                             f"into container {c.name}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.symlink(c.run_private / os.path.basename(path), path)


def link_log(c: _Container, path: str) -> None:
    """The container writes the agent's log file through a hard link in its private
    log folder (same file system, so both names are one file)."""
    if os.path.dirname(path) != str(c.log_dir):
        raise InstanceFailed(f"log {path} is not in {c.log_dir}, the folder mounted "
                             f"into container {c.name}")
    inside = c.log_private / os.path.basename(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(inside)
    os.link(path, inside)
    os.chown(path, c.uid, c.uid)
