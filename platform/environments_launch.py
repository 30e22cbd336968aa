"""Which environment a launch runs in: the one its snapshot recorded (rebuilt from that
lock on any node), the one its bundle's dependency file resolves to (builds and fresh
starts), or none (the node's base environment); and what a restore of it is checked
against."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

from thaw.core.config import AgentConfig
from thaw.core.errors import InstanceFailed
from thaw.core.units import parse_size
from thaw.platform.environments import lock_pins, read_dependencies
from thaw.platform.environments_build import (
    Environment,
    Environments,
    EnvSettings,
    Progress,
)
from thaw.platform.environments_provided import PROVIDED_FOR, folder_for
from thaw.platform.runtime import PythonEnv, RuntimeCapabilities
from thaw.platform.templates import TemplatePool
from thaw.proto import agent_pb2, manifest_pb2
from thaw.snapshotter.manifest import manifest_key

# Why a node cannot give a function an environment of its own.
ENVIRONMENTS_NEED_PROCESS_RUNTIME = (
    "this node's runtime runs no per-function Python environments (the process and "
    "docker runtimes do; an image function brings its packages in its image)")


class LaunchEnvironments:
    """The agent's side of environments: one per launch, or None for the base one."""

    def __init__(self, environments: Environments | None,
                 capabilities: RuntimeCapabilities) -> None:
        self.environments = environments
        self.capabilities = capabilities
        self.in_use: dict[str, str] = {}
        """Owner (an instance or a build) -> the key of the environment it runs in:
        garbage collection keeps these."""
        self.provided: dict[str, str] = {}
        """Environment key -> the folder of packages the platform provides it (cog for
        a cog.yaml environment: environments_provided.py); "" where it gets none."""

    async def for_bundle(self, bundle: Path, function: str, progress: Progress,
                         image: str = "") -> Environment | None:
        """The environment the bundle's dependency file asks for (resolved, built or
        cached), None without one. InvalidBundle for a bad file, InstanceFailed for a
        failed resolve or install (with uv's message)."""
        if image:
            return None  # an image carries its own packages
        deps = await asyncio.to_thread(read_dependencies, bundle)
        if deps is None:
            return None
        envs = self._required()
        lock = await envs.resolve(deps, progress)
        env = await envs.ensure(lock, deps.python, progress, source=deps.source,
                                function=function)
        await self._provide(envs, env)
        return env

    async def for_snapshot(self, recorded: manifest_pb2.Environment | None, function: str,
                           progress: Progress) -> Environment | None:
        """The environment a snapshot was taken in, rebuilt from its lock where this
        node lacks it; None for a snapshot of the base environment."""
        if recorded is None or not recorded.key:
            return None
        # A restore says nothing of an environment it finds: only of one it builds.
        env = await self._required().ensure(recorded.lock, recorded.python, progress,
                                            source=recorded.source, function=function,
                                            say_cached=False)
        if env.key != recorded.key:
            raise InstanceFailed(f"the snapshot's lock names environment "
                                 f"{recorded.key}, this node builds it as {env.key} (another "
                                 f"platform: {recorded.platform})")
        await self._provide(self._required(), env)
        return env

    async def _provide(self, envs: Environments, env: Environment) -> None:
        """Make (once) the folder of the platform's packages `env` lacks, where its
        dependency file gets any."""
        if env.key in self.provided or env.source not in PROVIDED_FOR:
            return  # known, or a file the platform provides nothing for (no lock read)
        self.provided[env.key] = await asyncio.to_thread(folder_for, envs.root, env.source,
                                                         env.lock)

    def hold(self, owner: str, env: Environment | None) -> None:
        """`owner` runs in `env` until `release(owner)`."""
        if env is not None:
            self.in_use[owner] = env.key

    def release(self, owner: str) -> None:
        self.in_use.pop(owner, None)

    def python_env(self, env: Environment | None) -> PythonEnv | None:
        """How a launch runs in `env` (None: the base environment); no disk access."""
        if env is None or self.environments is None:
            return None
        python_env = self.environments.python_env(env)
        extra = self.provided.get(env.key)
        if not extra:
            return python_env
        # After the runtime on the path; it holds only names the environment lacks,
        # so it shadows none of the environment's own packages.
        return dataclasses.replace(
            python_env, paths=(*python_env.paths, extra), provided=(extra,),
            runtime_path=os.pathsep.join((python_env.runtime_path, extra)))

    def in_use_keys(self, keep: list[manifest_pb2.SnapshotManifest],
                    template_keys: set[str]) -> set[str]:
        """Environments a kept snapshot, a live instance, a build or a template (of
        `template_keys`) runs in."""
        return ({m.environment.key for m in keep if m.environment.key}
                | set(self.in_use.values()) | template_keys)

    async def collect(self, keep: list[manifest_pb2.SnapshotManifest],
                      template_keys: set[str]) -> dict[str, int]:
        """Remove the node's environments nothing in use runs in; their keys and the
        bytes each held."""
        if self.environments is None:
            return {}
        return await asyncio.to_thread(self.environments.collect,
                                       self.in_use_keys(keep, template_keys))

    async def reply(self, request: agent_pb2.EnvironmentsRequest,
                    templates: TemplatePool) -> agent_pb2.EnvironmentsResponse:
        """`thaw env ls` on this node; with `collect`, `thaw env gc` first."""
        if self.environments is None:
            return agent_pb2.EnvironmentsResponse()
        removed: dict[str, int] = {}
        if request.collect:
            # As garbage collection does: templates of snapshots no longer kept first.
            await templates.collect({manifest_key(m) for m in request.keep})
            removed = await self.collect(list(request.keep), templates.environment_keys())
        in_use = self.in_use_keys([], templates.environment_keys())
        return await asyncio.to_thread(environments_reply, self.environments, removed,
                                       in_use)

    def _required(self) -> Environments:
        if self.environments is None or not self.capabilities.python_environments:
            raise InstanceFailed(ENVIRONMENTS_NEED_PROCESS_RUNTIME)
        return self.environments


def environments_reply(envs: Environments, removed: dict[str, int], in_use: set[str]
                       ) -> agent_pb2.EnvironmentsResponse:
    """`thaw env ls` of this node, after what a collection `removed` (blocking)."""
    return agent_pb2.EnvironmentsResponse(
        environments=[agent_pb2.EnvironmentInfo(
            key=e.env.key, python=e.env.python, packages=e.env.packages,
            size_bytes=e.env.size_bytes, source=e.env.source, functions=e.functions,
            last_used=e.last_used, in_use=e.env.key in in_use)
            for e in envs.listing()],
        removed=sorted(removed), freed_bytes=sum(removed.values()))


def recorded(env: Environment) -> manifest_pb2.Environment:
    """What a snapshot records of its environment, for a restore on any node."""
    return manifest_pb2.Environment(key=env.key, python=env.python, platform=env.platform,
                                    lock=env.lock, source=env.source)


def snapshot_environment(manifest: manifest_pb2.SnapshotManifest
                         ) -> manifest_pb2.Environment | None:
    return manifest.environment if manifest.HasField("environment") else None


def environment_fingerprint(local: dict[str, str], env: Environment | None,
                            own_python: bool = False) -> dict[str, str]:
    """What a restore in `env` is checked against: the node's device facts, and the
    environment's Python, torch and numpy (its pins), never the node's own. With
    `own_python` (RuntimeCapabilities.environments_on_own_python) the Python is the
    runtime's (`local`'s): its interpreter runs the environment's packages."""
    if env is None:
        return local
    pins = lock_pins(env.lock)
    python = local.get("python", "") if own_python else env.python
    return {**local, "python": python, "torch": pins.get("torch", ""),
            "numpy": pins.get("numpy", "")}


def environment_settings(cfg: AgentConfig, uid_range: tuple[int, int]) -> EnvSettings:
    """The agent's env_* settings; the index falls back to the machine's (UV_INDEX_URL,
    else pip's configuration: EnvSettings.from_environ); the builder's uid is the one
    just below the tenants' range."""
    fallback = (EnvSettings(index_url=cfg.env_index_url) if cfg.env_index_url
                else EnvSettings.from_environ(os.environ))
    return EnvSettings(index_url=fallback.index_url,
                       extra_index_urls=fallback.extra_index_urls,
                       build_timeout=cfg.env_build_timeout,
                       max_bytes=parse_size(cfg.env_max_size), builder_uid=uid_range[0] - 1,
                       index_hosts=tuple(cfg.env_index_hosts))


def default_environments(home: Path, runtime: object, uid_range: tuple[int, int],
                         settings: EnvSettings | None = None) -> Environments | None:
    """The node's environments under <home>/envs, built with the runtime's sandboxed
    tools (`run_tool`); None on a runtime that runs no tools. Without `settings`: the
    index from THAW_ENV_INDEX_URL, else the machine's (UV_INDEX_URL, pip's) and the builder uid
    just below the tenants' range."""
    run_tool = getattr(runtime, "run_tool", None)
    if run_tool is None:
        return None
    if settings is None:
        settings = dataclasses.replace(EnvSettings.from_environ(os.environ),
                                       builder_uid=uid_range[0] - 1)
    return Environments(home / "envs", settings, run_tool)
