"""Zygotes: one process per Python environment and sandbox that imported the
environment's packages once; templates of different code fork from it, so an idle
function's template costs only what its own code adds, not another copy of torch.

A zygote is keyed by everything a launched template's confinement is made of: the
Python environment, and the sandbox (tenant uid and gid, writable folders, network),
so a template forked from it is walled off exactly as a launched one would be. In a
sandbox a zygote sees no bundle at launch: the agent hard-links each bundle one of its
templates needs into a folder of that zygote's own (only ever bundles of its tenant),
bound read-only where the node's bundles are, so a forked template finds its bundle at
the same path a launched one does.

What a zygote imports: the modules of the first snapshot that asks for it, less the
function's own code (the bundle's top-level modules and packages). Functions of one
environment import its packages (one lock, one set of packages), so that is the heavy
part they share; a function importing more of the environment imports the rest in its
own template. Tenant code never runs in a zygote.

A zygote that fails to start, whose imports initialised CUDA (it could not fork), or
that cannot fork a template: the template is launched as it would be without zygotes.
Never a failed call."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from thaw.core.errors import DeadlineExceeded, InstanceFailed
from thaw.core.eventloop import read_pipe_file
from thaw.platform.memfds import text_memfd
from thaw.platform.process import log_tail, send_request
from thaw.platform.runtime import (
    Exited,
    Failed,
    LaunchedInstance,
    LaunchMode,
    LaunchSpec,
    Runtime,
    SnapshotFiles,
    Spawned,
    StatusEvent,
    TemplateReady,
    describe_exit,
    exit_event,
    parse_status,
)
from thaw.platform.sandbox.areas import TenantArea, open_tenant_file
from thaw.snapshotter.runtime.forksafe import NVML_CHECK_ENV
from thaw.snapshotter.runtime.zygote import IMPORT_ENV_MARK, TemplateRequest

log = structlog.get_logger()
# How long the zygote may take to tell that a template it forked ended (it reaps the
# child and writes a line on its status pipe) before the agent takes it as killed.
EXIT_REPORT_WAIT_SECONDS = 5.0
# How often the agent looks whether such a template is gone meanwhile.
EXIT_POLL_SECONDS = 0.05
# Where a zygote's bundle links live, under the agent's home.
BUNDLE_VIEWS = "zygote-bundles"
_KILLED = -signal.SIGKILL


class ZygoteLaunch(LaunchSpec):
    """A zygote's launch: the runtime's `zygote` mode, with no bundle and no handler."""

    def command(self) -> list[str]:
        return ["zygote", "--control", self.control]


class ForkedProcess:
    """A template's process as the agent knows it when a zygote forked it: not the
    agent's child, so its exit code comes from the zygote."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def ended(self, code: int) -> None:
        if not self._exit.done():
            self._exit.set_result(code)


@dataclass
class ForkedTemplate:
    """A template a zygote forked, with the status pipe the agent gave it."""

    proc: ForkedProcess
    events: asyncio.StreamReader
    log_path: str
    zygote: str
    """The key of the zygote it came from."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def next_event(self, timeout: float) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(self.events.readline(), timeout)
        except TimeoutError as exc:
            await self.kill()
            raise DeadlineExceeded(f"template did not report within {timeout:.0f}s") from exc
        except ValueError as exc:
            await self.kill()
            raise InstanceFailed("template wrote a status line too long to read") from exc
        if not line:
            code = await self._reported_exit()
            tail = log_tail(self.log_path)
            raise InstanceFailed(f"template exited ({describe_exit(code)}) before it was "
                                 f"ready" + (f"; last output:\n{tail}" if tail else ""))
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            await self.kill()
            raise InstanceFailed(f"template wrote a status line that is not a JSON object: "
                                 f"{line[:200]!r}")
        return event

    async def next_status(self, timeout: float) -> StatusEvent:
        record = await self.next_event(timeout)
        typed = parse_status(record)
        if typed is None:
            raise InstanceFailed(f"template reported an unknown event: {record}")
        return typed

    async def exited(self) -> Exited:
        return exit_event(await self.proc.wait())

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        await self._reported_exit()

    async def _reported_exit(self) -> int:
        """Its exit code as the zygote reports it; -SIGKILL when the process is gone
        (or a zombie) without a report, e.g. while the agent stops and no longer
        follows the zygote's status."""
        deadline = asyncio.get_running_loop().time() + EXIT_REPORT_WAIT_SECONDS
        while self.proc.returncode is None:
            if _gone(self.proc.pid) or asyncio.get_running_loop().time() > deadline:
                # A moment for the zygote's report of a child it just reaped.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), EXIT_POLL_SECONDS)
                self.proc.ended(_KILLED)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), EXIT_POLL_SECONDS)
        return self.proc.returncode if self.proc.returncode is not None else _KILLED


def _gone(pid: int) -> bool:
    """The process has ended: no such pid, or only its zombie is left."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


@dataclass
class Zygote:
    key: str
    process: LaunchedInstance
    control: str
    view: Path | None
    """Its bundle links (sandboxed runtimes); None: it sees the node's bundles."""
    import_seconds: float
    env_key: str = ""
    """The Python environment it runs ("": the node's)."""
    import_env: dict[str, str] = field(default_factory=dict)
    """The variables its imports ran with, as functions' imports set them."""
    forked: dict[int, ForkedProcess] = field(default_factory=dict)
    """Templates it forked that still run, by pid."""
    early_exits: dict[int, int] = field(default_factory=dict)
    """Exit codes reported before the agent knew the pid (a template that died at once)."""

    @property
    def running(self) -> bool:
        return self.process.proc.returncode is None


def zygote_modules(modules: Sequence[str], bundle: Path) -> list[str]:
    """`modules` (a snapshot's, in import order) without the bundle's own code."""
    own = {p.stem for p in bundle.glob("*.py")} | {p.name for p in bundle.iterdir()
                                                   if p.is_dir()}
    return list(dict.fromkeys(m for m in modules if m.split(".", 1)[0] not in own))


def import_env_set(reason: str) -> dict[str, str] | None:
    """What a forked template's failure says its function's code set in the
    environment as it was imported (zygote.py IMPORT_ENV_MARK); None when it says
    nothing of the kind, or removed a variable (no zygote imports with one taken away
    that its own environment has: such a template is launched); {} when it set
    nothing where the zygote expected it to."""
    at = reason.find(IMPORT_ENV_MARK)
    if at < 0:
        return None
    try:
        told, _end = json.JSONDecoder().raw_decode(reason, at + len(IMPORT_ENV_MARK))
    except ValueError:
        return None
    if not isinstance(told, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in told.items()):
        return None
    return dict(told)


def link_bundle(bundle: Path, view: Path) -> None:
    """Make `bundle` visible in a zygote's folder of bundles (hard links where the
    filesystem allows, copies elsewhere); blocking."""
    dest = view / bundle.name
    if dest.exists():
        return
    partial = view / f".{bundle.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(bundle, partial, copy_function=link_or_copy, symlinks=True)
    try:
        os.rename(partial, dest)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not dest.exists():
            raise


class ZygotePool:
    """The node's zygotes, by Python environment and sandbox."""

    def __init__(self, *, runtime: Runtime, home: Path, start_timeout: float,
                 spawn_task: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.runtime = runtime
        self.home = home
        """The agent's home: bundle views live under it (root-owned, read-only to
        tenants)."""
        self.start_timeout = start_timeout
        self._spawn_task = spawn_task
        self.zygotes: dict[str, Zygote] = {}
        self._starts: dict[str, asyncio.Task[Zygote | None]] = {}
        self.unusable: dict[str, str] = {}
        """Zygote key -> why templates of it are launched instead (no zygote)."""
        # Views of zygotes of an earlier run of the agent (they died with it).
        shutil.rmtree(home / BUNDLE_VIEWS, ignore_errors=True)

    @staticmethod
    def key(launch: LaunchSpec, import_env: dict[str, str] | None = None) -> str:
        """Everything a template's confinement and interpreter are made of, and the
        variables its imports ran with."""
        env = launch.python_env
        policy = launch.sandbox
        parts = [f"env:{env.key if env else ''}:{env.python if env else ''}",
                 f"uid:{policy.uid}:{policy.gid}", f"network:{policy.network}",
                 "writable:" + ":".join(policy.writable),
                 f"device:{','.join(launch.device.gpu_ids)}"]
        if import_env:
            parts.append("import-env:" + json.dumps(import_env, sort_keys=True))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]

    async def fork_template(self, launch: LaunchSpec, area: TenantArea,
                            modules: Sequence[str],
                            import_env: dict[str, str] | None = None
                            ) -> ForkedTemplate | None:
        """A template forked from the zygote of `launch`'s environment and sandbox
        (whose imports ran with `import_env` set), not yet ready (read its status as
        a launched one's); None where it cannot be (the caller launches it)."""
        if launch.image or launch.volumes or launch.snapshot is None or not launch.bundle:
            return None
        key = self.key(launch, import_env)
        if key in self.unusable:
            return None
        zygote = await self._ensure(key, launch, area, modules, import_env or {})
        if zygote is None:
            return None
        try:
            return await self._fork(zygote, launch)
        except (InstanceFailed, OSError, TimeoutError, ValueError) as exc:
            log.warning("zygote could not fork a template: launching it instead",
                        zygote=key, error=str(exc))
            return None

    async def _ensure(self, key: str, launch: LaunchSpec, area: TenantArea,
                      modules: Sequence[str], import_env: dict[str, str]) -> Zygote | None:
        zygote = self.zygotes.get(key)
        if zygote is not None and zygote.running:
            return zygote
        task = self._starts.get(key)
        if task is None:
            task = asyncio.create_task(self._start(key, launch, area, modules, import_env))
            self._starts[key] = task
            task.add_done_callback(lambda _t: self._starts.pop(key, None))
        return await asyncio.shield(task)

    async def _start(self, key: str, launch: LaunchSpec, area: TenantArea,
                     modules: Sequence[str], import_env: dict[str, str]) -> Zygote | None:
        bundle = Path(launch.bundle)
        bundles_root = str(bundle.parent)
        names = await asyncio.to_thread(zygote_modules, modules, bundle)
        control = str(area.run / f"z-{key[:16]}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        view: Path | None = None
        volumes: tuple[tuple[str, str], ...] = ()
        if launch.sandbox.uid > 0:
            # Sandboxed: the zygote's root holds only its own tenant's bundles, where
            # the node's bundles are (so a template's paths are a launched one's).
            view = self.home / BUNDLE_VIEWS / key[:16]
            await asyncio.to_thread(view.mkdir, mode=0o755, parents=True, exist_ok=True)
            volumes = ((str(view), bundles_root),)
        spec = ZygoteLaunch(
            mode=LaunchMode.TEMPLATE, bundle="", handler="",
            log_path=str(area.logs / f"zygote-{key[:16]}.log"),
            instance_id=f"zygote-{key[:16]}", env={**import_env, NVML_CHECK_ENV: "1"},
            control=control,
            snapshot=SnapshotFiles(json.dumps({"modules": names})),
            # No function's limits: it serves every function of its environment.
            device=launch.device, sandbox=launch.sandbox, cwd=bundles_root,
            volumes=volumes, python_env=launch.python_env)
        try:
            proc = await self.runtime.launch(spec)
            event = await proc.next_event(self.start_timeout)
        except (InstanceFailed, DeadlineExceeded, OSError) as exc:
            self.unusable[key] = f"zygote did not start: {exc}"
            log.warning("zygote did not start: templates launch on their own", zygote=key,
                        error=str(exc))
            return None
        ready = parse_status(event)
        if not isinstance(ready, TemplateReady) or not ready.fork_safe:
            await proc.kill()
            reason = (ready.unsafe_reason if isinstance(ready, TemplateReady)
                      else f"zygote failed: {event.get('reason', event)}")
            self.unusable[key] = reason
            log.warning("zygote unusable: templates launch on their own", zygote=key,
                        reason=reason)
            return None
        seconds = float(ready.timings.get("import", 0.0))
        zygote = Zygote(key, proc, control, view, seconds,
                        env_key=launch.python_env.key if launch.python_env else "",
                        import_env=dict(import_env))
        self.zygotes[key] = zygote
        self._spawn_task(self._follow(zygote))
        log.info("zygote ready", zygote=key, pid=proc.pid, modules=len(names),
                 import_s=round(seconds, 3))
        return zygote

    async def _fork(self, zygote: Zygote, launch: LaunchSpec) -> ForkedTemplate:
        assert launch.snapshot is not None
        if zygote.view is not None:
            await asyncio.to_thread(link_bundle, Path(launch.bundle), zygote.view)
        request = TemplateRequest(launch.bundle, launch.handler, launch.control,
                                  dict(launch.env), dict(zygote.import_env))
        read_fd, write_fd = os.pipe()
        passed = [write_fd]
        try:
            passed.insert(0, await asyncio.to_thread(text_memfd, "thaw-template-meta",
                                                     launch.snapshot.snapshot_json))
            # The log is in the tenant's area: never follow a link planted there.
            passed.append(open_tenant_file(launch.log_path,
                                           os.O_WRONLY | os.O_CREAT | os.O_APPEND))
            conn = await asyncio.to_thread(send_request, zygote.control, request.to_line(),
                                           passed, self.start_timeout)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            for fd in passed:
                with contextlib.suppress(OSError):
                    os.close(fd)
        reader, writer = await asyncio.open_unix_connection(sock=conn, limit=1 << 20)
        try:
            line = await asyncio.wait_for(reader.readline(), self.start_timeout)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            writer.close()
        answer = parse_status(json.loads(line)) if line.strip() else None
        if not isinstance(answer, Spawned):
            os.close(read_fd)
            reason = answer.reason if isinstance(answer, Failed) else line[:200].decode(
                errors="replace") or "no answer"
            raise InstanceFailed(f"zygote did not fork the template: {reason}")
        proc = ForkedProcess(answer.pid)
        early = zygote.early_exits.pop(answer.pid, None)
        if early is not None:
            proc.ended(early)
        elif not zygote.running:
            proc.ended(_KILLED)
        else:
            zygote.forked[answer.pid] = proc
        events = asyncio.StreamReader(limit=1 << 20)
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(events), read_pipe_file(read_fd))
        return ForkedTemplate(proc, events, launch.log_path, zygote.key)

    async def _follow(self, zygote: Zygote) -> None:
        """The exits of its templates arrive on the zygote's status pipe; at its end,
        the zygote is gone and so are they (they die with it)."""
        while True:
            line = await zygote.process.events.readline()
            if not line:
                break
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                event = json.loads(line)
                if event.get("event") == "child_exited":
                    pid, code = int(event["pid"]), int(event["returncode"])
                    proc = zygote.forked.pop(pid, None)
                    if proc is None:
                        zygote.early_exits[pid] = code
                    else:
                        proc.ended(code)
        await zygote.process.exited()
        for proc in zygote.forked.values():
            proc.ended(_KILLED)
        zygote.forked.clear()
        if self.zygotes.get(zygote.key) is zygote:
            await self._stop(zygote)

    def environment_keys(self) -> set[str]:
        """The Python environments running zygotes use."""
        return {z.env_key for z in self.zygotes.values() if z.env_key}

    async def prune(self) -> None:
        """Stop the zygotes no running template came from (the next template of their
        environment starts one again)."""
        for zygote in [z for z in self.zygotes.values() if not z.forked]:
            await self._stop(zygote)

    async def close(self) -> None:
        for zygote in list(self.zygotes.values()):
            await self._stop(zygote)

    async def _stop(self, zygote: Zygote) -> None:
        self.zygotes.pop(zygote.key, None)
        await zygote.process.kill()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(zygote.control)
        if zygote.view is not None:
            await asyncio.to_thread(shutil.rmtree, zygote.view, True)
        log.info("zygote stopped", zygote=zygote.key)


__all__ = ["ForkedTemplate", "Zygote", "ZygoteLaunch", "ZygotePool", "link_bundle",
           "zygote_modules"]
