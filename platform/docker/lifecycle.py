"""DockerRuntime: starts containers from LaunchSpecs, follows their status streams and
exits, and removes them (see the package docstring for the design)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import shutil
import signal
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog

from thaw.core.config import AgentConfig
from thaw.core.errors import ImageNotOnNode, InstanceFailed, ThawError
from thaw.core.eventloop import read_pipe_file
from thaw.core.units import parse_size
from thaw.platform import images
from thaw.platform.docker.containers import (
    ContainerProcess,
    ContainerRuntimeProcess,
    _Container,
    container_name,
    prepare_container,
)
from thaw.platform.docker.pids import can_limit_other_uids, exit_code_from_engine
from thaw.platform.docker.spawn import spawn_in_container, translate_event
from thaw.platform.docker.spec import (
    DEFAULT_MEMORY_BYTES,
    LABEL_PREFIX,
    PIDS_LIMIT,
    TEMPLATE_INSTANCES,
    TMPFS_TMP,
    ContainerSettings,
    container_kwargs,
    memory_limit,
    site_packages,
)
from thaw.platform.image_load import ImageLoader, loader_for
from thaw.platform.process import (
    ProcessRuntime,
    ProcessWatch,
    RuntimeProcess,
    process_stats,
    terminate,
)
from thaw.platform.runtime import (
    BuildRequest,
    InstanceHandle,
    InstanceStats,
    LaunchMode,
    LaunchSpec,
    Limits,
    RuntimeCapabilities,
    SpawnRequest,
    ToolRun,
    spawn_request,
)
from thaw.platform.sandbox.areas import parse_uid_range
from thaw.platform.sandbox.plan import SandboxSettings

log = structlog.get_logger()

T = TypeVar("T")

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


class DockerRuntime:
    """Instances in containers on the local docker engine (the `Runtime` protocol).

    `client` is a docker.DockerClient; `image` must exist (images.ensure_base_image).
    `env_site_packages` are host folders (e.g. a virtualenv's site-packages) mounted
    read-only at the same paths and put on PYTHONPATH, for functions needing packages:
    the image's Python must have the same minor version as the one they were built
    for. A function with its own environment gets its site-packages instead; `tools`
    runs the environment builder's uv on the host (run_tool)."""

    name = "docker"
    # Environments are built on the host (run_tool) and run by the image's python3 with
    # their site-packages on PYTHONPATH (docs/environments.md, "Runtimes").
    capabilities = RuntimeCapabilities(runs_images=True, template_per_tenant=True,
                                       python_environments=True,
                                       environments_on_own_python=True)

    def __init__(self, client: Any, *, image: str, node_id: str, state_dir: Path,
                 device: str = "host", env_site_packages: Sequence[str] = (),
                 env: dict[str, str] | None = None,
                 default_memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 template_instances: int = TEMPLATE_INSTANCES,
                 pids_limit: int = PIDS_LIMIT, tmpfs_tmp: str = TMPFS_TMP,
                 uid_base: int = UID_BASE, own_uids: bool | None = None,
                 mps_pipe_directory: str = "", image_loader: ImageLoader | None = None,
                 tools: ProcessRuntime | None = None) -> None:
        self.client = client
        # Node tools (the environment builder's uv) run on the host, in the process
        # runtime's sandbox where the agent is root, as they do on a process node.
        self.tools = tools or ProcessRuntime(
            sandbox=SandboxSettings() if os.geteuid() == 0 else None)
        # Loads an image function's missing image from its uploaded archive; without
        # one, a missing image fails the start.
        self.image_loader = image_loader
        self.node_id = node_id
        self.agent_id = uuid.uuid4().hex[:12]
        self.state_dir = state_dir / self.agent_id
        self.settings = ContainerSettings(
            image=image, node_id=node_id, agent_id=self.agent_id, agent_pid=os.getpid(),
            device=device, env=dict(env or {}),
            env_site_packages=tuple(str(Path(p).resolve()) for p in env_site_packages),
            default_memory_bytes=default_memory_bytes,
            template_instances=template_instances, pids_limit=pids_limit,
            tmpfs_tmp=tmpfs_tmp, mps_pipe_directory=mps_pipe_directory)
        self.uid_base = uid_base
        # None: decide as the package docstring ("Users") says.
        self.own_uids = (own_uids if own_uids is not None
                         else device == "cuda" or can_limit_other_uids())
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

    # Settings by their constructor's names (tests and callers read them).
    @property
    def image(self) -> str:
        return self.settings.image

    @property
    def device(self) -> str:
        return self.settings.device

    @property
    def default_memory_bytes(self) -> int:
        return self.settings.default_memory_bytes

    @property
    def template_instances(self) -> int:
        return self.settings.template_instances

    @classmethod
    def from_config(cls, cfg: AgentConfig) -> DockerRuntime:
        """From the agent's settings (docker_image, docker_site_packages, ...). The
        image must have been built (`thaw image build`): that takes minutes, too long
        for an agent's start."""
        client = images.docker_client()
        node_id = cfg.node_id or socket.gethostname()
        image = cfg.docker_image or images.image_tag(images.find_apt_source().suite)
        site = cfg.docker_site_packages
        runtime = cls(client, image=image, node_id=node_id,
                      state_dir=cfg.home / "agent" / node_id / "containers",
                      device=cfg.device,
                      env_site_packages=[p for p in site.split(os.pathsep) if p],
                      tools=tool_runtime(cfg))
        runtime.image_loader = loader_for(cfg, client, cfg.home / "agent" / node_id,
                                          runtime._engine)
        runtime.remove_stale_containers()
        return runtime

    async def run_tool(self, tool: ToolRun) -> tuple[int, str]:
        """Run a node tool (the environment builder's uv) on the host: the process
        runtime's run_tool (ProcessRuntime.run_tool)."""
        return await self.tools.run_tool(tool)

    def _check_environment(self, spec: LaunchSpec) -> None:
        """A function's environment runs on the image's python3: its compiled packages
        need the same minor version as the Python it was made with."""
        env = spec.python_env
        if env is None or spec.image or not self.python_version or not env.version:
            return
        made, image = (".".join(v.split(".")[:2]) for v in (env.version, self.python_version))
        if made != image:
            raise InstanceFailed(f"environment {env.key[:12]} is for Python {made}; this "
                                 f"node's image {self.image} has Python {image}")

    # ---- engine calls -------------------------------------------------------------

    async def _engine(self, call: Callable[[], T]) -> T:
        """A blocking docker SDK call, in our own bounded pool, its errors translated."""
        import docker.errors

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, call)
        except docker.errors.DockerException as exc:
            raise InstanceFailed(f"docker engine: {exc}") from exc

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
        """spec.memory_limit for a mode and limits given one by one."""
        spec = LaunchSpec(mode=LaunchMode(mode), bundle="", handler="", log_path="",
                          instance_id="", limits=Limits(memory_limit_bytes, max_instances))
        return memory_limit(spec, self.settings)

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

    async def _ensure_image(self, image_id: str, reference: str) -> None:
        """The image on this engine: loaded from its uploaded archive when missing."""
        check = functools.partial(self._check_image, image_id, reference)
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, check)
        except ImageNotOnNode:
            if self.image_loader is None:
                raise
            await self.image_loader.ensure(image_id, reference, self.node_id)
            await asyncio.get_running_loop().run_in_executor(self._executor, check)

    async def launch(self, spec: LaunchSpec) -> RuntimeProcess:
        """Start a container running the in-instance runtime as `spec` says.

        The container's memory limit is the function's `limits.memory_bytes` plus
        BASE_MEMORY_BYTES, or `default_memory_bytes` when it is 0; a template's holds
        its forked instances as well (spec.memory_limit). `device.gpu_ids` (cuda
        backend) limits the container to those GPUs; without them a cuda container
        gets every GPU. `image` (an image function's pinned reference) replaces the
        base image (package docstring, "Image functions")."""
        if spec.image:
            await self._ensure_image(spec.image.rpartition("@")[2], spec.image)
        self._check_environment(spec)
        name = container_name(self.node_id, spec.mode.value, uuid.uuid4().hex[:10])
        c, layout = await asyncio.to_thread(
            prepare_container, spec, name, self._allocate_uid(), self.state_dir,
            site_packages(spec, self.settings), self._readable)
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
            kwargs = container_kwargs(spec, self.settings, layout)
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
        if spec.mode in (LaunchMode.TEMPLATE, LaunchMode.RESTORE) and spec.control:
            self._by_control[spec.control] = c
        log.debug("container started", container=c.name, mode=spec.mode.value,
                  pid=c.host_pid)
        return ContainerRuntimeProcess(cast(Any, c.proc), events, spec.log_path)

    # ---- status events and exits ----------------------------------------------------

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
                events.feed_data(translate_event(c, line))
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

    # ---- spawn (restore inside a template's container) -------------------------------

    async def spawn(self, control_socket: str,
                    request: SpawnRequest | Mapping[str, Any],
                    timeout: float) -> tuple[int, dict[str, Any]]:
        """Fork a restored instance from a template (or restore in a restore-mode
        container): (host pid, ready event)."""
        c = self._by_control.get(control_socket)
        if c is None or c.proc is None or c.proc.returncode is not None:
            raise InstanceFailed(f"no running template container for {control_socket}")
        with spawn_request(request) as typed:
            return await spawn_in_container(c, control_socket, typed, timeout)

    async def build_in_template(self, control_socket: str, request: BuildRequest,
                                timeout: float) -> dict[str, Any] | None:
        """None: builds run in containers of their own (package docstring: fresh
        starts and builds get a container each)."""
        del control_socket, request, timeout
        return None

    async def stop(self, handle: InstanceHandle, reason: str) -> None:
        """SIGTERM the instance's process group, SIGKILL after a grace; a container's
        main process takes its container with it."""
        del reason  # the agent logs it
        await terminate(handle.pid)

    def stats(self, handle: InstanceHandle) -> InstanceStats:
        return process_stats(handle)

    # ---- shutdown --------------------------------------------------------------------

    async def close(self) -> None:
        """Remove every container this runtime started that is still there."""
        import docker.errors

        if self.image_loader is not None:
            await self.image_loader.close()

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


def tool_runtime(cfg: AgentConfig) -> ProcessRuntime:
    """Where a docker node runs its tools: the process runtime's sandbox (tmp size and
    uid range as configured; no GPU) when the agent is root and the sandbox is on,
    else as the agent's user (uv runs no package code: wheels only)."""
    if cfg.sandbox == "off" or os.geteuid() != 0:
        return ProcessRuntime(sandbox=None)
    return ProcessRuntime(sandbox=SandboxSettings(
        uid_range=parse_uid_range(cfg.sandbox_uids),
        tmp_bytes=parse_size(cfg.sandbox_tmp_size)))


def _remove_container(container: Any) -> None:
    import docker.errors

    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True)
