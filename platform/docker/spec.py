"""A container's create arguments, from a LaunchSpec: pure functions, no engine and
no file system, so every option a container gets is checked by a unit test."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thaw.platform import images
from thaw.platform.runtime import LaunchMode, LaunchSpec, MountKind, public_names_file

RUNTIME_MODULE = "thaw.snapshotter.runtime"
# The repo's snapshotter/ folder, mounted read-only as thaw.snapshotter.
SNAPSHOTTER_DIR = Path(__file__).resolve().parent.parent.parent / "snapshotter"
# Keep in sync with images.RUNTIME_ROOT (the image has the empty folder).
RUNTIME_ROOT = images.RUNTIME_ROOT
RUNTIME_MOUNT = f"{RUNTIME_ROOT}/thaw/snapshotter"
# The `thaw` package's own file (`from thaw import Input, InvalidInput, ...`).
PUBLIC_NAMES_MOUNT = f"{RUNTIME_ROOT}/thaw/__init__.py"
# Inside every container: the private folder with the status FIFO and, for a template,
# a copy of its snapshot.json (its module list; never a file of the snapshot store).
STATUS_DIR = "/run/thaw/status"
STATUS_FIFO = f"{STATUS_DIR}/events"
SNAPSHOT_META = "snapshot.json"
# The runtime writes status events on this fd (opened on the FIFO by the shell), and a
# template reads its snapshot.json from SNAPSHOT_FD (opened by the shell too).
STATUS_FD = 3
SNAPSHOT_FD = 4

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
LABEL_PREFIX = "thaw."
# The engine keeps this much of a container's own output (the runtime's goes to its log).
ENGINE_LOG_CONFIG = {"type": "json-file", "config": {"max-size": "1m", "max-file": "1"}}


@dataclass(frozen=True)
class ContainerSettings:
    """What every container of one runtime shares (DockerRuntime's configuration)."""

    image: str
    node_id: str
    agent_id: str
    agent_pid: int
    device: str = "host"
    env: Mapping[str, str] = field(default_factory=dict)
    env_site_packages: tuple[str, ...] = ()
    default_memory_bytes: int = DEFAULT_MEMORY_BYTES
    template_instances: int = TEMPLATE_INSTANCES
    pids_limit: int = PIDS_LIMIT
    tmpfs_tmp: str = TMPFS_TMP
    mps_pipe_directory: str = ""


@dataclass(frozen=True)
class ContainerLayout:
    """The host folders one container gets (made by containers.prepare_layout)."""

    name: str
    uid: int
    status_dir: str
    """Host folder holding the status FIFO, mounted at STATUS_DIR."""
    log_dir: str
    """The agent's log folder; the container sees `log_private` there."""
    log_private: str
    run_dir: str = ""
    """The agent's socket folder; the container sees `run_private` there."""
    run_private: str = ""


@dataclass(frozen=True)
class BindMount:
    """One bind mount, as docker.types.Mount takes it."""

    target: str
    source: str
    read_only: bool

    def to_docker(self) -> Any:
        from docker.types import Mount

        return Mount(self.target, self.source, type="bind", read_only=self.read_only)


def site_packages(spec: LaunchSpec, settings: ContainerSettings) -> tuple[str, ...]:
    """Host package folders for a container: none in an image function's image (its
    packages are the image's; the host's would shadow them); a function's own
    environment's site-packages instead of the node's (the image's python3 runs it),
    then the folders the platform provides to that environment."""
    if spec.image:
        return ()
    if spec.python_env is not None:
        own = (spec.python_env.site_packages,) if spec.python_env.site_packages else ()
        return (*own, *spec.python_env.provided)
    return settings.env_site_packages


def memory_limit(spec: LaunchSpec, settings: ContainerSettings) -> int:
    """The container's memory limit: the function's own plus BASE_MEMORY_BYTES (or the
    default when it sets none), times the instances a template's container holds."""
    count = spec.limits.max_instances or (
        settings.template_instances if spec.mode is LaunchMode.TEMPLATE else 1)
    per_instance = (BASE_MEMORY_BYTES + spec.limits.memory_bytes
                    if spec.limits.memory_bytes > 0 else settings.default_memory_bytes)
    return per_instance * max(1, count)


def socket_dir(spec: LaunchSpec) -> str:
    """The one folder holding the sockets an instance binds ("" if it binds none)."""
    folders = {os.path.dirname(m.path) for m in spec.mounts() if m.kind is MountKind.SOCKET}
    if len(folders) > 1:
        raise ValueError(f"sockets of one instance in several folders: {sorted(folders)}")
    return folders.pop() if folders else ""


def container_mounts(spec: LaunchSpec, layout: ContainerLayout,
                     settings: ContainerSettings) -> list[BindMount]:
    """Host paths appear at their own paths: the bundle read-only, a build's output
    writable; sockets and the log through the container's private folders; the
    in-instance runtime and the status folder at fixed places. No snapshot data is
    mounted: restores get it as descriptors over their control sockets."""
    mounts = [BindMount(RUNTIME_MOUNT, str(SNAPSHOTTER_DIR), read_only=True),
              BindMount(PUBLIC_NAMES_MOUNT, public_names_file(), read_only=True),
              BindMount(STATUS_DIR, layout.status_dir, read_only=True),
              BindMount(layout.log_dir, layout.log_private, read_only=False)]
    mounts += [BindMount(site, site, read_only=True) for site in site_packages(spec, settings)]
    for mount in spec.mounts():
        if mount.kind is not MountKind.SOCKET:
            mounts.append(BindMount(mount.inside, mount.path, read_only=mount.read_only))
    if layout.run_dir:
        mounts.append(BindMount(layout.run_dir, layout.run_private, read_only=False))
    if settings.device == "cuda" and settings.mps_pipe_directory:
        mounts.append(BindMount(settings.mps_pipe_directory, settings.mps_pipe_directory,
                                read_only=False))
    return mounts


def labels(settings: ContainerSettings, instance: str, mode: str) -> dict[str, str]:
    return {f"{LABEL_PREFIX}instance": instance, f"{LABEL_PREFIX}node": settings.node_id,
            f"{LABEL_PREFIX}agent": settings.agent_id, f"{LABEL_PREFIX}mode": mode,
            f"{LABEL_PREFIX}agent_pid": str(settings.agent_pid)}


def shell_command(spec: LaunchSpec) -> list[str]:
    """No descriptor can be inherited into a container: the shell opens the status FIFO
    on STATUS_FD (and a template's snapshot.json on SNAPSHOT_FD) and sends the runtime's
    output to its log."""
    runtime = ["python3", "-m", RUNTIME_MODULE, *spec.command(),
               "--status-fd", str(STATUS_FD)]
    redirects = f"{STATUS_FD}>{STATUS_FIFO}"
    if spec.snapshot is not None:
        runtime += ["--snapshot-fd", str(SNAPSHOT_FD)]
        redirects += f" {SNAPSHOT_FD}<{STATUS_DIR}/{SNAPSHOT_META}"
    return ["sh", "-c", f"exec {shlex.join(runtime)} >>{shlex.quote(spec.log_path)} 2>&1 "
                        f"{redirects}"]


def create_kwargs(spec: LaunchSpec, settings: ContainerSettings, *, name: str, uid: int,
                  mounts: list[Any], memory_bytes: int) -> dict[str, Any]:
    """docker's containers.create arguments for `spec`, with its mounts given."""
    from docker.types import DeviceRequest

    instance = spec.instance_id or Path(spec.log_path).stem
    pythonpath = os.pathsep.join([RUNTIME_ROOT, *site_packages(spec, settings)])
    sandbox = spec.sandbox
    kwargs: dict[str, Any] = dict(
        # An image function's image by its id (the reference's tag may have moved).
        image=spec.image.rpartition("@")[2] if spec.image else settings.image,
        command=shell_command(spec), name=name,
        labels=labels(settings, instance, spec.mode.value), mounts=mounts,
        working_dir=spec.cwd or "/tmp", user=f"{uid}:{uid}",
        environment={"PYTHONPATH": pythonpath, "PYTHONDONTWRITEBYTECODE": "1",
                     "HOME": "/tmp", "USER": "thaw", "LANG": "C.UTF-8", **settings.env,
                     **spec.environment},
        cap_drop=list(sandbox.cap_drop),
        security_opt=["no-new-privileges"] if sandbox.no_new_privileges else [],
        read_only=sandbox.read_only_rootfs, tmpfs={"/tmp": settings.tmpfs_tmp},
        pids_limit=spec.limits.pids or settings.pids_limit, mem_limit=memory_bytes,
        # egress: the engine's default bridge, from which the host's loopback (where
        # the platform listens) is out of reach.
        network_mode="bridge" if sandbox.network == "egress" else "none",
        stdin_open=False, log_config=ENGINE_LOG_CONFIG)
    if settings.device == "cuda":
        # A fresh instance gets the GPU of its slice; a template, every GPU: its
        # instances get slices on any of them.
        gpu_ids = list(spec.device.gpu_ids)
        kwargs["device_requests"] = [
            DeviceRequest(device_ids=gpu_ids, capabilities=[["gpu"]]) if gpu_ids
            else DeviceRequest(count=-1, capabilities=[["gpu"]])]
        # CUDA IPC: the opener must see the exporter's PID namespace (package doc).
        kwargs["pid_mode"] = "host"
        if settings.mps_pipe_directory:
            kwargs["environment"]["CUDA_MPS_PIPE_DIRECTORY"] = settings.mps_pipe_directory
            kwargs["ipc_mode"] = "host"
    return kwargs


def container_kwargs(spec: LaunchSpec, settings: ContainerSettings,
                     layout: ContainerLayout) -> dict[str, Any]:
    """Everything a container of `spec` is created with."""
    mounts = [m.to_docker() for m in container_mounts(spec, layout, settings)]
    return create_kwargs(spec, settings, name=layout.name, uid=layout.uid, mounts=mounts,
                         memory_bytes=memory_limit(spec, settings))
