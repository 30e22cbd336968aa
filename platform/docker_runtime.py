"""The docker runtime: instances run in hardened containers on the local engine
(DESIGN.md §7), behind the process runtime's interface (process.py: launch, spawn,
close), so the agent runs unchanged.

What runs where
    Every `launch` (modes fresh, build, template, restore) is a container of its own
    running the in-instance runtime, `python3 -m thaw.snapshotter.runtime`, from the
    repo's snapshotter/ folder mounted read-only at /opt/thaw/thaw/snapshotter (an empty
    `thaw` namespace, PYTHONPATH=/opt/thaw). A restore (`spawn`) is a process forked by
    its template *inside the template's container*: forking a warm zygote takes a few
    ms, while a new container costs about 0.3 s before Python even starts. The
    trade-off: the instances restored from one template share its container, so they
    share its cgroup (the memory and pids limits cover the template and all its
    instances; each instance still gets the agent's own RLIMIT_DATA, which works on
    host pids) and see each other's processes. The agent keys templates by code, not
    by function; with this runtime it must also key them by tenant (the lead's diff
    to agent.template_key), so one container never holds two tenants' instances and
    the boundary between tenants, and between any of them and the host, stays a
    container. Fresh starts and builds get a container each.

Paths need no translation
    The agent passes host paths; each appears at the same path inside the container.
    The bundle folder is mounted read-only, the build output folder writable, and
    snapshot files one by one, read-only (their folders hold other snapshots). Sockets
    and logs are not shared folders either (a tenant could reach or replace another
    tenant's socket, or read its log): each container gets private host folders
    mounted at the socket folder's and the log folder's paths; on the host the agent's
    socket path is a symlink into the private folder and its log file a hard link to
    the one the container writes, so the agent connects and reads where it always does.
    The one rewrite: a spawn request naming snapshot files its template's container
    does not see (templates are shared by snapshots with the same code) gets them
    hard-linked into the container's snapshot view (/run/thaw/snapshots) and its paths
    pointed there; the links go once the instance has mapped them.

Status events
    No descriptor can be handed into a container: the runtime writes its JSON lines on
    fd 3, which `sh -c 'exec ... 3>/run/thaw/status/events'` opens on a FIFO in a
    private folder mounted read-only. The agent side holds a spare write end until the
    container's main process ends, so the stream ends exactly when a process's pipe
    would.

Host pids and exit codes
    `.pid` is the host pid of the container's main process (`State.Pid`), so the
    agent's pidfd watch, prlimit and signals work as for processes (runc makes that
    process a session leader, so killpg works too). A template reports a forked
    instance by its pid in the container's namespace; `spawn` finds the host pid by the
    NSpid line of /proc/<pid>/status of the template's children, and `child_exited`
    events on the template's stream are rewritten to it. The exit code of a
    container's main process comes from the engine's wait; a signal death (128+N
    there) reads -N, as subprocess reports it.

Hardening (every container)
    cap_drop ALL, no-new-privileges, read-only root with a tmpfs /tmp, pids and memory
    limits, network "none" (instances talk to the agent only over their mounted unix
    sockets), labels thaw.instance,
    thaw.node, thaw.agent, thaw.mode, thaw.agent_pid. A container is removed when its
    main process ends; `close()` removes any left; an agent starting on a node removes
    the containers of a dead agent of the same node.

Users
    Each container runs as a uid of its own (no two live containers share one, so none
    can signal or trace another even where it sees its pids) when the agent can still
    cap an instance's memory then: its RLIMIT_DATA (agent.limit_memory, a prlimit) on a
    process of another uid needs CAP_SYS_RESOURCE. Where the agent lacks it (some
    sandboxed hosts, this project's CI among them) containers of the host backend run
    as the agent's uid instead, with no capabilities: in a private PID namespace there
    is nothing of another container's or the host's to signal or trace, and the
    per-instance memory limit keeps working. cuda containers (which share the host PID
    namespace, below) always get their own uid; there the memory limit is the
    container's cgroup only when the agent cannot prlimit.

Environments
    The base image (images.py) has python3 only. `env_site_packages` mounts host
    package folders (e.g. the agent's virtualenv) read-only at the same paths, after
    /opt/thaw on PYTHONPATH (their .pth files are not run); their C extensions load
    when the image's Python has the same minor version. The image's Python, not the
    agent's, is what a snapshot's fingerprint names: `fingerprint()` says so to the
    agent.

Image functions
    A function whose thaw.toml names `[runtime] image` (pinned: `repo:tag@sha256:<id>`,
    what `thaw deploy IMAGE` writes) runs every container of it (build, template,
    fresh) in that image, by id, instead of the base image: the tenant's packages come
    from the image, so the host folders of `env_site_packages` are neither mounted nor
    put on PYTHONPATH (they would shadow the image's site-packages). Its code still
    comes from the uploaded bundle (the copy the CLI took out of the image), mounted
    as for any function, so the agent's bundle, code digest and template bookkeeping
    stay one path. Everything else is the same: the runtime mounted at /opt/thaw,
    sockets and logs mounted, network "none", the same hardening. Nothing is pulled:
    the image must be on this node's engine (`docker load` it there), else the start
    fails saying so. The image needs `sh` and a `python3` >= 3.10.

CUDA
    GPUs are requested by a DeviceRequest when the device backend is cuda (the slice's
    GPU for a fresh instance, every GPU for a template, whose instances may get slices
    on any). Legacy CUDA IPC handles only open in a process that sees the exporter's
    (the agent's) PID namespace (DESIGN.md §6; platform/cuda.py), so cuda containers
    join the host PID namespace (`pid_mode="host"`). What that costs: an instance can
    list the host's processes; it still cannot signal or trace any (a uid of its own,
    no capabilities, no-new-privileges). With MPS, the daemon's pipe folder is mounted and
    the IPC namespace shared. The way out is VMM allocations exported as POSIX file
    descriptors and passed over the instance's socket; then this flag goes. The host
    backend never shares a namespace with the host.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog

from thaw.core.errors import (
    DeadlineExceeded,
    ImageNotOnNode,
    InstanceFailed,
    SnapshotError,
    ThawError,
)
from thaw.core.eventloop import read_pipe_file
from thaw.platform import images
from thaw.platform.process import ProcessWatch, RuntimeProcess, log_tail

log = structlog.get_logger()

T = TypeVar("T")

RUNTIME_MODULE = "thaw.snapshotter.runtime"
# The repo's snapshotter/ folder, mounted read-only as thaw.snapshotter.
SNAPSHOTTER_DIR = Path(__file__).resolve().parent.parent / "snapshotter"
# Keep in sync with images.RUNTIME_ROOT (the image has the empty folder).
RUNTIME_ROOT = images.RUNTIME_ROOT
RUNTIME_MOUNT = f"{RUNTIME_ROOT}/thaw/snapshotter"
# Inside every container: the private folder with the status FIFO, and (templates)
# the folder where a restore's snapshot files appear as hard links.
STATUS_DIR = "/run/thaw/status"
STATUS_FIFO = f"{STATUS_DIR}/events"
SNAPSHOT_VIEW_DIR = "/run/thaw/snapshots"
# The runtime writes status events on this fd (opened on the FIFO by the shell).
STATUS_FD = 3

# Memory of a container when the function sets no limit.
DEFAULT_MEMORY_BYTES = 4 << 30
# What a container holds beyond the function's own `resources.memory`: the interpreter,
# its imports and the restored or set-up state.
BASE_MEMORY_BYTES = 1 << 30
# How many instances' memory a template's container has room for, unless told.
TEMPLATE_INSTANCES = 4
# Processes and threads per container; torch starts one thread per core per pool.
PIDS_LIMIT = 4096
TMPFS_TMP = "rw,nosuid,nodev,size=256m,mode=1777"
# Needed to prlimit a process of another uid (module docstring, "Users").
CAP_SYS_RESOURCE = 24  # <linux/capability.h>
# Per-container uids (none is in /etc/passwd; HOME is /tmp).
UID_BASE = 200_000
UID_COUNT = 100_000
# Blocking engine calls run here, never on the event loop nor in the default pool.
DOCKER_THREADS = 8
# Seconds the engine may take for one call (create/start can be slow under load).
DOCKER_TIMEOUT_SECONDS = 120
# Lines of the engine's own log of a container kept when it fails.
ENGINE_LOG_LINES = 20
# How long close() waits for killed containers to be reaped and removed.
CLOSE_SECONDS = 30.0
# A template's forked child is found among its processes within this long.
PID_LOOKUP_SECONDS = 2.0
# Signal deaths come back from the engine as 128+N (the shell convention).
SIGNAL_EXIT_BASE = 128
LABEL_PREFIX = "thaw."

# Runtime options naming files the container reads (each mounted read-only at its
# own path) and sockets it binds (in its private socket folder).
_READ_ONLY_FILES = ("--snapshot-json", "--pickle", "--host-arena", "--device-arena")
_SOCKET_OPTIONS = ("--socket", "--control")


def exit_code_from_engine(status: int) -> int:
    """The engine's StatusCode as subprocess would report it (-N for signal N).
    An `exit(137)` is indistinguishable from SIGKILL here; the runtime's own exit
    codes are all below 128 (events.ExitCode)."""
    if SIGNAL_EXIT_BASE < status < SIGNAL_EXIT_BASE + 65:
        return -(status - SIGNAL_EXIT_BASE)
    return status


def ns_pid(host_pid: int) -> int | None:
    """A process's pid in its innermost PID namespace (last NSpid field)."""
    try:
        with open(f"/proc/{host_pid}/status") as handle:
            for line in handle:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


def _children(host_pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{host_pid}/task"):
            with contextlib.suppress(OSError), \
                    open(f"/proc/{host_pid}/task/{tid}/children") as handle:
                found += [int(p) for p in handle.read().split()]
    return found


def host_pid_of(parent_host_pid: int, child_ns_pid: int) -> int | None:
    """The host pid of a process its parent knows as `child_ns_pid` (a template's
    forked instance): first among the parent's children, then among every process in
    the parent's PID namespace."""
    for child in _children(parent_host_pid):
        if ns_pid(child) == child_ns_pid:
            return child
    try:
        namespace = os.readlink(f"/proc/{parent_host_pid}/ns/pid")
    except OSError:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                continue
        except OSError:
            continue
        if ns_pid(int(entry)) == child_ns_pid:
            return int(entry)
    return None


def can_limit_other_uids() -> bool:
    """Whether this process may set resource limits of processes of other uids (it has
    CAP_SYS_RESOURCE; root usually has, some sandboxes strip it)."""
    try:
        with open("/proc/self/status") as handle:
            caps = next(int(line.split()[1], 16) for line in handle
                        if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(caps >> CAP_SYS_RESOURCE & 1)


def _options(args: Sequence[str]) -> dict[str, str]:
    """`--name value` pairs of a runtime command line."""
    found: dict[str, str] = {}
    items = list(args)
    for index, item in enumerate(items[:-1]):
        if item.startswith("--"):
            found[item] = items[index + 1]
    return found


def _make_readable(folder: Path) -> None:
    """Give others read (and directory search) permission: the container's uid is not
    the agent's, and a bundle may have been packed with owner-only modes."""
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files, ""]:
            path = os.path.join(root, name) if name else root
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if stat.S_ISLNK(mode):
                continue
            want = mode | stat.S_IROTH | stat.S_IRGRP
            if stat.S_ISDIR(mode):
                want |= stat.S_IXOTH | stat.S_IXGRP
            if want != mode:
                with contextlib.suppress(OSError):
                    os.chmod(path, stat.S_IMODE(want))


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
    # Host files and folders mounted read-only at their own paths.
    read_only_files: set[str] = field(default_factory=set)
    read_only_dirs: set[str] = field(default_factory=set)
    # Templates: host folder (beside the snapshot files, for hard links) mounted at
    # SNAPSHOT_VIEW_DIR.
    snapshot_view: Path | None = None
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
        return path in self.read_only_files or any(
            path.startswith(d.rstrip("/") + "/") for d in self.read_only_dirs)


class DockerRuntime:
    """Instances in containers on the local docker engine (see the module docstring).

    `client` is a docker.DockerClient; `image` must exist (images.ensure_base_image).
    `env_site_packages` are host folders (e.g. a virtualenv's site-packages) mounted
    read-only at the same paths and put on PYTHONPATH, for functions needing packages:
    the image's Python must have the same minor version as the one they were built
    for."""

    name = "docker"

    def __init__(self, client: Any, *, image: str, node_id: str, state_dir: Path,
                 device: str = "host", env_site_packages: Sequence[str] = (),
                 env: dict[str, str] | None = None,
                 default_memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 template_instances: int = TEMPLATE_INSTANCES,
                 pids_limit: int = PIDS_LIMIT, tmpfs_tmp: str = TMPFS_TMP,
                 uid_base: int = UID_BASE, own_uids: bool | None = None,
                 mps_pipe_directory: str = "") -> None:
        self.client = client
        self.image = image
        self.node_id = node_id
        self.agent_id = uuid.uuid4().hex[:12]
        self.state_dir = state_dir / self.agent_id
        self.device = device
        self.env_site_packages = [str(Path(p).resolve()) for p in env_site_packages]
        self.env = dict(env or {})
        self.default_memory_bytes = default_memory_bytes
        self.template_instances = template_instances
        self.pids_limit = pids_limit
        self.tmpfs_tmp = tmpfs_tmp
        self.uid_base = uid_base
        # None: decide as the module docstring ("Users") says.
        self.own_uids = (own_uids if own_uids is not None
                         else device == "cuda" or can_limit_other_uids())
        self.mps_pipe_directory = mps_pipe_directory
        self._uids_in_use: set[int] = set()
        self._next_uid = 0
        self._containers: dict[str, _Container] = {}
        self._by_control: dict[str, _Container] = {}
        self._readable: set[str] = set()  # bundles already made readable
        self._images_seen: set[str] = set()  # image function images found on the engine
        self._executor = concurrent.futures.ThreadPoolExecutor(
            DOCKER_THREADS, thread_name_prefix="thaw-docker")
        self.python_version = images.image_python(client, image)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.own_uids:
            log.info("containers run as the agent's uid (no CAP_SYS_RESOURCE to cap the "
                     "memory of other uids)", uid=os.getuid())

    @classmethod
    def from_config(cls, cfg: Any) -> DockerRuntime:
        """From the agent's config: AgentConfig.docker_image and docker_site_packages
        (THAW_DOCKER_IMAGE, THAW_DOCKER_SITE_PACKAGES; read from the environment here
        while the config lacks those fields). The image must have been built (`thaw
        image build`): that takes minutes, too long for an agent's start."""
        client = images.docker_client()
        node_id = str(getattr(cfg, "node_id", "") or socket.gethostname())
        image = (getattr(cfg, "docker_image", "") or os.environ.get("THAW_DOCKER_IMAGE")
                 or images.image_tag(images.find_apt_source().suite))
        site = (getattr(cfg, "docker_site_packages", "")
                or os.environ.get("THAW_DOCKER_SITE_PACKAGES", ""))
        home = Path(cfg.home)
        runtime = cls(client, image=image, node_id=node_id,
                      state_dir=home / "agent" / node_id / "containers",
                      device=str(getattr(cfg, "device", "host")),
                      env_site_packages=[p for p in site.split(os.pathsep) if p])
        runtime.remove_stale_containers()
        return runtime

    # ---- engine calls -------------------------------------------------------------

    async def _engine(self, call: Callable[[], T]) -> T:
        """A blocking docker SDK call, in our own bounded pool, its errors translated."""
        import docker.errors

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, call)
        except docker.errors.DockerException as exc:
            raise InstanceFailed(f"docker engine: {exc}") from exc

    def labels(self, instance: str, mode: str) -> dict[str, str]:
        return {f"{LABEL_PREFIX}instance": instance, f"{LABEL_PREFIX}node": self.node_id,
                f"{LABEL_PREFIX}agent": self.agent_id, f"{LABEL_PREFIX}mode": mode,
                f"{LABEL_PREFIX}agent_pid": str(os.getpid())}

    def remove_stale_containers(self) -> int:
        """Remove containers of this node left by an agent that is gone (killed without
        its close()); those of a live agent of the same node id are kept."""
        import docker.errors

        removed = 0
        try:
            stale = self.client.containers.list(
                all=True, filters={"label": f"{LABEL_PREFIX}node={self.node_id}"})
        except docker.errors.DockerException as exc:
            raise InstanceFailed(f"docker engine: {exc}") from exc
        for container in stale:
            owner = (container.labels or {}).get(f"{LABEL_PREFIX}agent_pid", "")
            if owner.isdigit() and Path(f"/proc/{owner}").exists():
                continue
            with contextlib.suppress(docker.errors.DockerException):
                container.remove(force=True)
                removed += 1
        if removed:
            log.info("removed containers of a previous agent", node=self.node_id,
                     count=removed)
        return removed

    # ---- launch ---------------------------------------------------------------------

    def _allocate_uid(self) -> int:
        if not self.own_uids:
            return os.getuid()
        for _ in range(UID_COUNT):
            uid = self.uid_base + self._next_uid
            self._next_uid = (self._next_uid + 1) % UID_COUNT
            if uid not in self._uids_in_use:
                self._uids_in_use.add(uid)
                return uid
        raise InstanceFailed("no free container uid")

    def _memory_limit(self, mode: str, memory_limit_bytes: int,
                      max_instances: int | None) -> int:
        """A template's container holds its instances too: it gets room for
        `max_instances` of them (default `template_instances`)."""
        count = max_instances or (self.template_instances if mode == "template" else 1)
        per_instance = (BASE_MEMORY_BYTES + memory_limit_bytes if memory_limit_bytes > 0
                        else self.default_memory_bytes)
        return per_instance * max(1, count)

    def _check_image(self, image_id: str, reference: str) -> None:
        """An image function's image must already be on this engine (blocking)."""
        import docker.errors

        if image_id in self._images_seen:
            return
        try:
            self.client.images.get(image_id)
        except docker.errors.ImageNotFound as exc:
            raise ImageNotOnNode(
                f"image {reference} is not on node {self.node_id}'s docker engine "
                "(nothing is pulled: `docker load` it there)") from exc
        except docker.errors.DockerException as exc:
            raise InstanceFailed(f"docker engine: {exc}") from exc
        self._images_seen.add(image_id)

    def _site_packages(self, image: str) -> list[str]:
        """Host package folders for a container: none in an image function's image
        (module docstring, "Image functions")."""
        return [] if image else self.env_site_packages

    def _prepare(self, mode: str, args: Sequence[str], log_path: str,
                 uid: int, image: str = "") -> tuple[_Container, list[Any]]:
        """Host folders, links and the mount list of a new container (blocking I/O)."""
        from docker.types import Mount

        name = f"thaw-{self.node_id[:20]}-{mode}-{uuid.uuid4().hex[:10]}"
        name = "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in name)
        private = self.state_dir / name
        (private / "ctl").mkdir(parents=True)
        log_file = Path(log_path)
        log_dir = log_file.parent
        log_private = log_dir / ".containers" / name
        log_private.mkdir(parents=True)
        c = _Container(name, mode, uid, log_file.name, private, log_dir, log_private)
        fifo = private / "ctl" / "events"
        os.mkfifo(fifo, 0o600)
        os.chown(fifo, uid, uid)
        mounts = [
            Mount(RUNTIME_MOUNT, str(SNAPSHOTTER_DIR), type="bind", read_only=True),
            Mount(STATUS_DIR, str(private / "ctl"), type="bind", read_only=True),
            Mount(str(log_dir), str(log_private), type="bind", read_only=False),
        ]
        os.chown(log_private, uid, uid)
        self.link_log(c, log_path)
        for site in self._site_packages(image):
            mounts.append(Mount(site, site, type="bind", read_only=True))
            c.read_only_dirs.add(site)
        options = _options(args)
        bundle = options.get("--bundle")
        if bundle:
            if bundle not in self._readable:
                _make_readable(Path(bundle))
                self._readable.add(bundle)
            mounts.append(Mount(bundle, bundle, type="bind", read_only=True))
            c.read_only_dirs.add(bundle)
        out = options.get("--out")
        if out:
            os.chown(out, uid, uid)
            mounts.append(Mount(out, out, type="bind", read_only=False))
        # Snapshot files one by one, not their folders: those hold other snapshots
        # (and arenas shared by content), maybe other tenants'.
        for option in _READ_ONLY_FILES:
            value = options.get(option)
            if value and value not in c.read_only_files:
                c.read_only_files.add(value)
                mounts.append(Mount(value, value, type="bind", read_only=True))
        if mode == "template" and "--snapshot-json" in options:
            # Restores of other snapshots (templates are shared by code) get their
            # files hard-linked here; a hard link needs the same file system, so the
            # folder sits in the snapshots folder (dot-named: its GC skips those).
            snapshots = Path(options["--snapshot-json"]).parent.parent
            c.snapshot_view = snapshots / ".containers" / name
            c.snapshot_view.mkdir(parents=True)
            mounts.append(Mount(SNAPSHOT_VIEW_DIR, str(c.snapshot_view), type="bind",
                                read_only=True))
        socket_dirs = {os.path.dirname(options[o]) for o in _SOCKET_OPTIONS if o in options}
        if len(socket_dirs) > 1:
            raise InstanceFailed(f"sockets of one instance in several folders: {socket_dirs}")
        if socket_dirs:
            c.run_dir = Path(socket_dirs.pop())
            c.run_private = private / "run"
            c.run_private.mkdir()
            os.chown(c.run_private, uid, uid)
            mounts.append(Mount(str(c.run_dir), str(c.run_private), type="bind",
                                read_only=False))
            for option in _SOCKET_OPTIONS:
                if option in options:
                    self.link_socket(c, options[option])
        return c, mounts

    def link_socket(self, c: _Container, path: str) -> None:
        """The agent's socket path -> where the container binds it."""
        assert c.run_dir is not None and c.run_private is not None
        if os.path.dirname(path) != str(c.run_dir):
            raise InstanceFailed(f"socket {path} is not in {c.run_dir}, the folder mounted "
                                 f"into container {c.name}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.symlink(c.run_private / os.path.basename(path), path)

    def link_log(self, c: _Container, path: str) -> None:
        """The container writes the agent's log file through a hard link in its
        private log folder (same file system, so both names are one file)."""
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

    def _run_kwargs(self, c: _Container, mode: str, args: Sequence[str], log_path: str,
                    cwd: str | None, mounts: list[Any], instance: str,
                    memory_bytes: int, env: dict[str, str],
                    gpu_device_ids: Sequence[str] = (), image: str = "") -> dict[str, Any]:
        from docker.types import DeviceRequest, Mount

        runtime = ["python3", "-m", RUNTIME_MODULE, mode, *args,
                   "--status-fd", str(STATUS_FD)]
        shell = (f"exec {shlex.join(runtime)} >>{shlex.quote(log_path)} 2>&1 "
                 f"{STATUS_FD}>{STATUS_FIFO}")
        pythonpath = os.pathsep.join([RUNTIME_ROOT, *self._site_packages(image)])
        kwargs: dict[str, Any] = dict(
            # An image function's image by its id (the reference's tag may have moved).
            image=image.rpartition("@")[2] if image else self.image,
            command=["sh", "-c", shell], name=c.name,
            labels=self.labels(instance, mode), mounts=mounts,
            working_dir=cwd or "/tmp", user=f"{c.uid}:{c.uid}",
            environment={"PYTHONPATH": pythonpath, "PYTHONDONTWRITEBYTECODE": "1",
                         "HOME": "/tmp", "USER": "thaw", "LANG": "C.UTF-8", **self.env, **env},
            cap_drop=["ALL"], security_opt=["no-new-privileges"], read_only=True,
            tmpfs={"/tmp": self.tmpfs_tmp}, pids_limit=self.pids_limit,
            mem_limit=memory_bytes, network_mode="none", stdin_open=False,
            log_config={"type": "json-file", "config": {"max-size": "1m", "max-file": "1"}})
        if self.device == "cuda":
            # A fresh instance gets the GPU of its slice; a template, every GPU: its
            # instances get slices on any of them.
            kwargs["device_requests"] = [
                DeviceRequest(device_ids=list(gpu_device_ids), capabilities=[["gpu"]])
                if gpu_device_ids else DeviceRequest(count=-1, capabilities=[["gpu"]])]
            # CUDA IPC: the opener must see the exporter's PID namespace (module doc).
            kwargs["pid_mode"] = "host"
            if self.mps_pipe_directory:
                mounts.append(Mount(self.mps_pipe_directory, self.mps_pipe_directory,
                                    type="bind", read_only=False))
                kwargs["environment"]["CUDA_MPS_PIPE_DIRECTORY"] = self.mps_pipe_directory
                kwargs["ipc_mode"] = "host"
        return kwargs

    async def launch(self, mode: str, args: Sequence[str], log_path: str,
                     cwd: str | None = None, env: dict[str, str] | None = None, *,
                     instance_id: str | None = None, memory_limit_bytes: int = 0,
                     max_instances: int | None = None,
                     gpu_device_ids: Sequence[str] = (), image: str = "") -> RuntimeProcess:
        """Start a container running the runtime in `mode`.

        `env` is added to the container's environment (the agent's instance_env).
        `instance_id` labels the container (default: the log file's name).
        `memory_limit_bytes` is the function's `resources.memory` (FunctionSpec
        memory_limit_bytes, beyond its restored state; 0 = none set): the container's
        limit is that plus BASE_MEMORY_BYTES, or `default_memory_bytes` when it is 0. A
        template's container holds its forked instances as well, so its limit is
        `max_instances` (default `template_instances`) times that. `gpu_device_ids`
        (cuda backend: the slice's GPU UUID) limits the container to those GPUs;
        without it a cuda container gets every GPU. `image` (an image function's
        pinned reference) replaces the base image (module docstring, "Image
        functions")."""
        instance = instance_id or Path(log_path).stem
        if image:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._check_image, image.rpartition("@")[2], image)
        c, mounts = await asyncio.to_thread(self._prepare, mode, args, log_path,
                                         self._allocate_uid(), image)
        self._containers[c.name] = c
        loop = asyncio.get_running_loop()
        try:
            # Read end first (non-blocking open of a FIFO never waits), then our spare
            # write end: without it the reader would see EOF before the container opens
            # its end.
            fifo = c.private / "ctl" / "events"
            read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            c.keeper_fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            raw = asyncio.StreamReader(limit=1 << 20)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(raw),
                                         read_pipe_file(read_fd))
            kwargs = self._run_kwargs(c, mode, args, log_path, cwd, mounts, instance,
                                      self._memory_limit(mode, memory_limit_bytes,
                                                         max_instances), env or {},
                                      gpu_device_ids, image)
            # create + start, never `run`: run pulls a missing image from a registry.
            c.container = await self._engine(lambda: self.client.containers.create(**kwargs))
            await self._engine(c.container.start)
            await self._engine(c.container.reload)
            c.host_pid = int(c.container.attrs["State"]["Pid"] or 0)
        except BaseException:
            await self._remove(c)
            raise
        c.proc = ContainerProcess(c.host_pid)
        events = asyncio.StreamReader(limit=1 << 20)
        c.tasks.append(asyncio.create_task(self._pump(c, raw, events)))
        c.tasks.append(asyncio.create_task(self._follow_exit(c)))
        if mode == "template" and "--control" in (opts := _options(args)):
            self._by_control[opts["--control"]] = c
        log.debug("container started", container=c.name, mode=mode, pid=c.host_pid)
        return ContainerRuntimeProcess(cast(Any, c.proc), events, log_path)

    # ---- status events and exits ----------------------------------------------------

    def _translate(self, c: _Container, line: bytes) -> bytes:
        """Pids in an event -> host pids (the agent watches and signals host pids)."""
        try:
            event = json.loads(line)
        except ValueError:
            return line
        if not isinstance(event, dict) or "pid" not in event:
            return line
        pid = event["pid"]
        kind = event.get("event")
        if kind == "child_exited":
            host = c.children.pop(pid, None)
            if host is None:
                return line
            event["pid"] = host
        elif kind in ("ready", "template_ready") and c.host_pid and ns_pid(c.host_pid) == pid:
            event["pid"] = c.host_pid
        else:
            return line
        return json.dumps(event, separators=(",", ":")).encode() + b"\n"

    async def _pump(self, c: _Container, raw: asyncio.StreamReader,
                    events: asyncio.StreamReader) -> None:
        try:
            while True:
                try:
                    line = await raw.readline()
                except ValueError:  # a line past the limit: not ours, drop it
                    continue
                if not line:
                    break
                events.feed_data(self._translate(c, line))
        finally:
            events.feed_eof()

    async def _follow_exit(self, c: _Container) -> None:
        """When the main process ends: its exit code from the engine, then the
        container and its host-side files go."""
        assert c.proc is not None
        try:
            if c.host_pid:
                watch = ProcessWatch(c.host_pid)
                try:
                    await watch.done.wait()
                finally:
                    watch.close()
            try:
                result = await self._engine(lambda: c.container.wait(
                    timeout=DOCKER_TIMEOUT_SECONDS))
                code = exit_code_from_engine(int(result.get("StatusCode", -1)))
            except Exception as exc:  # the engine lost it: report a kill
                log.warning("no exit status from the engine", container=c.name,
                            error=str(exc))
                code = -signal.SIGKILL
            if code != 0:
                await self._keep_engine_output(c)
            c.proc.set_exit(code)
        finally:
            if c.keeper_fd is not None:
                os.close(c.keeper_fd)
                c.keeper_fd = None
            await self._remove(c)

    async def _keep_engine_output(self, c: _Container) -> None:
        """What the container printed before the runtime's output went to its log
        (the shell failing to open the log or the FIFO): appended to the log, where
        the agent's error messages quote it from."""
        try:
            output = await self._engine(lambda: c.container.logs(tail=ENGINE_LOG_LINES))
        except ThawError:
            return
        if output.strip():
            def append() -> None:
                with open(c.log_dir / c.log_name, "ab") as handle:
                    handle.write(b"[container] " + output)

            with contextlib.suppress(OSError):
                await asyncio.to_thread(append)

    async def _remove(self, c: _Container) -> None:
        """The container, then its host-side files; done once (and redone by close()
        if a removal was cut short)."""
        async with c.removing:
            if c.removed:
                return
            if c.keeper_fd is not None:
                os.close(c.keeper_fd)
                c.keeper_fd = None
            if c.container is not None:
                with contextlib.suppress(ThawError):
                    await self._engine(lambda: _remove_container(c.container))
            await asyncio.to_thread(self._remove_files, c)
            c.removed = True
            self._containers.pop(c.name, None)
            for control, owner in list(self._by_control.items()):
                if owner is c:
                    del self._by_control[control]
            self._uids_in_use.discard(c.uid)

    @staticmethod
    def _remove_files(c: _Container) -> None:
        shutil.rmtree(c.private, ignore_errors=True)
        shutil.rmtree(c.log_private, ignore_errors=True)
        if c.snapshot_view is not None:
            shutil.rmtree(c.snapshot_view, ignore_errors=True)

    # ---- spawn (restore inside a template's container) -------------------------------

    async def spawn(self, control_socket: str, request: dict[str, Any],
                    timeout: float) -> tuple[int, dict[str, Any]]:
        """Fork a restored instance from a template: (host pid, ready event)."""
        c = self._by_control.get(control_socket)
        if c is None or c.proc is None or c.proc.returncode is not None:
            raise InstanceFailed(f"no running template container for {control_socket}")
        request, view = await asyncio.to_thread(self._link_instance, c, request)
        try:
            return await self._spawn(c, control_socket, request, timeout)
        finally:
            if view is not None:
                # The instance mapped its files during the restore; the links only
                # had to last until then.
                await asyncio.to_thread(shutil.rmtree, view, True)

    async def _spawn(self, c: _Container, control_socket: str, request: dict[str, Any],
                     timeout: float) -> tuple[int, dict[str, Any]]:
        try:
            reader, writer = await asyncio.open_unix_connection(control_socket,
                                                                limit=1 << 20)
        except OSError as exc:
            raise InstanceFailed(f"template is not reachable: {exc}") from exc
        host_pid = 0
        try:
            writer.write(json.dumps({"op": "spawn", **request}).encode() + b"\n")
            await writer.drain()
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), timeout)
                except TimeoutError as exc:
                    if host_pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(host_pid, signal.SIGKILL)
                    raise DeadlineExceeded(
                        f"restore did not finish within {timeout:.0f}s") from exc
                if not line:
                    tail = log_tail(str(request.get("log", "")))
                    raise InstanceFailed("restored instance exited before it was ready"
                                         + (f"; last output:\n{tail}" if tail else ""))
                event = json.loads(line)
                kind = event.get("event")
                if kind == "spawned":
                    host_pid = await self._find_child(c, int(event["pid"]))
                elif kind == "ready":
                    if not host_pid:
                        host_pid = await self._find_child(c, int(event["pid"]))
                    if not host_pid:
                        raise InstanceFailed(
                            f"restored instance (pid {event['pid']} in container "
                            f"{c.name}) is not among the container's processes")
                    return host_pid, {**event, "pid": host_pid}
                elif kind == "failed":
                    raise SnapshotError(f"restore failed: {event.get('reason', 'unknown')}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _link_instance(self, c: _Container, request: dict[str, Any]
                       ) -> tuple[dict[str, Any], Path | None]:
        """Make a spawn request's files reachable in the template's container: socket
        and log as for a launch; snapshot files it does not see are hard-linked into
        its snapshot view and the request rewritten to name them there."""
        if request.get("socket"):
            self.link_socket(c, str(request["socket"]))
        if request.get("log"):
            self.link_log(c, str(request["log"]))
        request = dict(request)
        view: Path | None = None
        for key in ("snapshot_json", "pickle", "host_arena", "device_arena"):
            path = request.get(key)
            if not path or c.visible(str(path)):
                continue
            if c.snapshot_view is None:
                raise InstanceFailed(f"{key} {path} is not visible in container {c.name}")
            if view is None:
                view = c.snapshot_view / uuid.uuid4().hex[:12]
                view.mkdir()
            try:
                os.link(path, view / key)
            except OSError as exc:
                raise InstanceFailed(f"cannot show {key} {path} to container {c.name}: "
                                     f"{exc}") from exc
            request[key] = f"{SNAPSHOT_VIEW_DIR}/{view.name}/{key}"
        return request, view

    async def _find_child(self, c: _Container, child_ns_pid: int) -> int:
        """The host pid of a process the template forked; remembered so its
        child_exited event gets translated too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PID_LOOKUP_SECONDS
        while True:
            host = await asyncio.to_thread(host_pid_of, c.host_pid, child_ns_pid)
            if host is not None:
                c.children[child_ns_pid] = host
                return host
            if loop.time() > deadline:
                return 0
            await asyncio.sleep(0.01)

    # ---- shutdown --------------------------------------------------------------------

    async def close(self) -> None:
        """Remove every container this runtime started that is still there."""
        import docker.errors

        containers = list(self._containers.values())
        for c in containers:
            if c.proc is not None and c.proc.returncode is None and c.host_pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.host_pid, signal.SIGKILL)
        tasks = [task for c in containers for task in c.tasks]
        if tasks:
            # Each container's exit follower removes it; give them the time to.
            _done, pending = await asyncio.wait(tasks, timeout=CLOSE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for c in containers:
            await self._remove(c)
            if c.proc is not None and c.proc.returncode is None:
                c.proc.set_exit(-signal.SIGKILL)  # nobody may wait forever
        try:
            leftover = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: self.client.containers.list(
                    all=True, filters={"label": f"{LABEL_PREFIX}agent={self.agent_id}"}))
        except docker.errors.DockerException as exc:
            log.warning("could not list containers to remove", error=str(exc))
            leftover = []
        for container in leftover:
            with contextlib.suppress(docker.errors.DockerException):
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, _remove_container, container)
        await asyncio.to_thread(shutil.rmtree, self.state_dir, True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def containers(self) -> list[str]:
        """Names of the containers this runtime runs now (for tests and telemetry)."""
        return list(self._containers)

    def fingerprint(self) -> dict[str, str]:
        """What an instance's environment contributes to a snapshot's fingerprint: the
        image's Python, not the agent's (the agent checks restores against it)."""
        return {"python": self.python_version} if self.python_version else {}


def _remove_container(container: Any) -> None:
    import docker.errors

    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True)
