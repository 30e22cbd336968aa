"""A node's per-function Python environments: resolved and built with uv, once per lock.

Resolving (`uv pip compile`, pins with hashes) and installing (`uv pip install
--require-hashes`) both take wheels only (`--no-build`: no package's code runs while
an environment is made) and run as node tools in a sandbox of their own under the
builder uid (`ProcessRuntime.run_tool`), seeing only the index and their staging
folder. An environment is built in a staging folder, then made the agent's and
read-only, and only then renamed to <root>/<key>: a half-built one is never used, and
no tenant can change one that another tenant's functions run in. Resolutions are kept
per node (<root>/.locks) so fresh starts do not resolve again. docs/environments.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from thaw.core.errors import InstanceFailed
from thaw.platform.build_steps import counting_installs
from thaw.platform.environments import (
    Dependencies,
    environment_key,
    lock_pins,
    node_platform,
    node_python,
    resolution_key,
)
from thaw.platform.environments_index import IndexPlan, local_path, machine_indexes, plan_indexes
from thaw.platform.runtime import PythonEnv, ToolRun, public_names_file
from thaw.platform.sandbox.index_access import index_access
from thaw.platform.sandbox.index_proxy import Allowance, allowance_of

log = structlog.get_logger()
# The environment's record, beside its packages (read by `thaw env ls`).
RECORD = "thaw-env.json"
LOCK_FILE = "thaw-lock.txt"
# Bytes of the resolver's or installer's output kept for a failure's reason.
MAX_TOOL_OUTPUT = 4096
# Prefixes of the staging folders a build works in (collected when no build runs).
STAGING_PREFIXES = (".env-", ".resolve-")
# uv's own default index, where the node names none (its hosts are what the proxy allows).
DEFAULT_INDEX = "https://pypi.org/simple"

Progress = Callable[[str], None]
ToolRunner = Callable[[ToolRun], Awaitable[tuple[int, str]]]


@dataclass(frozen=True)
class EnvSettings:
    """How environments are made on this node (core/config_fields.py: env_*)."""

    index_url: str = ""
    """The package index: an URL, or a local folder of wheels (a path or file://);
    empty: uv's default index."""
    extra_index_urls: tuple[str, ...] = ()
    """Further indexes (pip's extra-index-url), searched before `index_url`."""
    build_timeout: float = 900.0
    """Seconds a resolve and an install may take, each."""
    max_bytes: int = 16 << 30
    """Largest environment installed (its folder's size)."""
    builder_uid: int = 199999
    """The uid uv runs as: outside the tenants' range (sandbox_uids)."""
    index_hosts: tuple[str, ...] = ()
    """Further hosts ([host]:port) and networks the index proxy may reach (env_index_hosts:
    an index's files host)."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str],
                     pip_files: Sequence[Path] | None = None) -> EnvSettings:
        """The index from THAW_ENV_INDEX_URL, else the machine's: UV_INDEX_URL, else
        pip's (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, pip's configuration `pip_files`,
        by default the ones pip reads)."""
        if environ.get("THAW_ENV_INDEX_URL"):
            return cls(index_url=environ["THAW_ENV_INDEX_URL"])
        index, extras = machine_indexes(environ, pip_files)
        return cls(index_url=index, extra_index_urls=extras)

    def local_index(self) -> str:
        """The folder of the primary index where it is local (no network), or ""."""
        return local_path(self.index_url)

    def index_plan(self) -> IndexPlan:
        """uv's index options, the local folders to bind and whether uv needs the
        network (reads the local folders: blocking)."""
        return plan_indexes(self.index_url, self.extra_index_urls)

    def allowance(self) -> Allowance:
        """What uv may reach through the index proxy: the URL indexes' hosts (uv's
        default one, PyPI, where none is named) and `index_hosts`."""
        urls = (self.index_url or DEFAULT_INDEX, *self.extra_index_urls)
        return allowance_of(urls, self.index_hosts)

    def index_name(self) -> str:
        """The indexes as one string (a resolution's key covers them)."""
        return "\0".join((self.index_url, *self.extra_index_urls))


@dataclass(frozen=True)
class Environment:
    """A built environment on this node."""

    key: str
    path: Path
    python: str
    """The interpreter's full version ("3.11.7")."""
    platform: str
    lock: str
    source: str
    packages: int
    size_bytes: int
    base_prefix: str = ""
    """The Python installation it was made from (its pyvenv.cfg's home, less bin/)."""


@dataclass(frozen=True)
class ListedEnvironment:
    """An environment as `thaw env ls` shows it."""

    env: Environment
    functions: tuple[str, ...]
    """Functions (tenant/name) that used it since the agent started."""
    last_used: float
    """Unix time; 0: never."""


class Environments:
    """Environments under `root` (<agent home>/envs): one folder per key, built once."""

    def __init__(self, root: Path, settings: EnvSettings, run_tool: ToolRunner) -> None:
        self.root = root
        self.settings = settings
        self.run_tool = run_tool
        self.platform = node_platform()
        for sub in ("", ".locks", ".used"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._building: dict[str, asyncio.Lock] = {}
        self.users: dict[str, set[str]] = {}
        """Environment key -> functions (tenant/name) that used it since the agent
        started."""
        self._runtime_path: str | None = None
        self._known: dict[str, Environment] = {}
        """Environments found or built since the agent started: a restore in one
        touches no disk."""
        self._last_used: dict[str, float] = {}
        self._locks: dict[str, str] = {}
        """Resolutions read or made since the agent started (<root>/.locks)."""
        self._running = 0
        """Resolves and builds in flight: while any runs, staging folders and uv's
        cache stay (collect)."""
        self.runtime_path()  # made now, at the agent's start: no launch waits for it

    # ---- resolving -----------------------------------------------------------------

    async def resolve(self, deps: Dependencies, progress: Progress) -> str:
        """The lock of `deps`, resolved once per node for these requests, Python,
        platform and index. InstanceFailed with the resolver's message."""
        name = resolution_key(deps, self.platform, self.settings.index_name())
        cached = self.root / ".locks" / f"{name}.txt"
        known = self._locks.get(name) or await asyncio.to_thread(_read_or_none, cached)
        if known is not None:
            self._locks[name] = known
            return known
        progress(f"resolving {len(deps.requirements)} requirements from {deps.source} "
                 f"for Python {deps.python}")
        with self._busy():
            lock = await self._resolve(deps, cached)
        self._locks[name] = lock
        return lock

    async def _resolve(self, deps: Dependencies, cached: Path) -> str:
        work = await asyncio.to_thread(self._workdir, "resolve")
        try:
            await asyncio.to_thread((work / "requirements.in").write_text,
                                    deps.request_text())
            await self._run(["pip", "compile", str(work / "requirements.in"), "-o",
                             str(work / "lock.txt"), "--generate-hashes", "--no-header",
                             "--no-annotate", "--python-version", deps.python,
                             "--python-platform", self.platform, "--no-build"], work,
                            "resolving the environment", indexes=True)
            lock = await asyncio.to_thread((work / "lock.txt").read_text)
        finally:
            await asyncio.to_thread(_remove, work)
        await asyncio.to_thread(_write_atomically, cached, lock)
        return lock

    # ---- building ------------------------------------------------------------------

    async def ensure(self, lock: str, python: str, progress: Progress, *,
                     source: str = "", function: str = "",
                     say_cached: bool = True) -> Environment:
        """The environment of `lock` for Python `python` (major.minor, or the full
        version a manifest recorded), built if this node has none; concurrent callers
        for one key build it once. `say_cached`: a found one is a progress line too."""
        want = ".".join(python.split(".")[:2])
        key = environment_key(lock, want, self.platform)
        found = self._known.get(key)
        if found is None:
            async with self._building.setdefault(key, asyncio.Lock()):
                found = await asyncio.to_thread(self.get, key)
                if found is None:
                    with self._busy():
                        found = await self._build(key, lock, want, source, progress)
                    say_cached = False
                self._known[key] = found
                # The last-used marker survives the agent; later uses are in memory.
                await asyncio.to_thread(self._mark_used, key)
        if say_cached:
            progress(f"environment {key[:12]} cached")
        self.touch(key, function)
        return found

    async def _build(self, key: str, lock: str, python: str, source: str,
                     progress: Progress) -> Environment:
        started = time.perf_counter()
        pins = lock_pins(lock)
        progress(f"installing {len(pins)} packages into environment {key[:12]}")
        staging = await asyncio.to_thread(self._workdir, f"env-{key[:12]}")
        try:
            await asyncio.to_thread((staging / LOCK_FILE).write_text, lock)
            env_dir = staging / "env"
            await self._run(["venv", "--relocatable", "--python", self._interpreter(python),
                             str(env_dir)], staging, "creating the environment's virtualenv")
            async with counting_installs(progress, env_dir, len(pins)):
                await self._run(["pip", "install", "--python",
                                 str(env_dir / "bin" / "python"), "--no-deps",
                                 "--require-hashes", "--no-build", "--link-mode", "copy",
                                 "-r", str(staging / LOCK_FILE)],
                                staging, "installing the environment", indexes=True)
            env = await asyncio.to_thread(self._finish, staging, key, lock, source,
                                          len(pins))
        finally:
            await asyncio.to_thread(_remove, staging)
        progress(f"environment {key[:12]} ready in {time.perf_counter() - started:.1f} s")
        log.info("environment built", key=key, packages=len(pins), size=env.size_bytes)
        return env

    def _finish(self, staging: Path, key: str, lock: str, source: str,
                packages: int) -> Environment:
        """The installed environment checked against the size bound, recorded, sealed
        and moved into place (blocking)."""
        env_dir = staging / "env"
        size = _folder_size(env_dir)
        if size > self.settings.max_bytes:
            raise InstanceFailed(f"the environment is {size} bytes installed, more than "
                                 f"the node's env_max_size ({self.settings.max_bytes})")
        os.replace(staging / LOCK_FILE, env_dir / LOCK_FILE)
        env = Environment(key=key, path=self.root / key, python=_venv_version(env_dir),
                          platform=self.platform, lock=lock, source=source,
                          packages=packages, size_bytes=size,
                          base_prefix=_venv_base_prefix(env_dir))
        (env_dir / RECORD).write_text(json.dumps(_record(env)))
        _seal(env_dir)
        os.replace(env_dir, self.root / key)
        return env

    def _interpreter(self, python: str) -> str:
        """This node's own interpreter for its version, else a version uv finds among
        the node's (it downloads none)."""
        if python == node_python():
            return str(getattr(sys, "_base_executable", "") or sys.executable)
        return python

    async def _run(self, args: list[str], work: Path, what: str, *,
                   indexes: bool = False) -> None:
        """uv with `args` (and the node's index options where `indexes`), sandboxed
        under the builder uid; InstanceFailed carrying the tail of its output when it
        fails."""
        uv = uv_program()
        cache = self.root / ".uv-cache"
        uid = self.settings.builder_uid
        await asyncio.to_thread(_owned_folder, cache, uid)
        plan = (await asyncio.to_thread(self.settings.index_plan) if indexes
                else IndexPlan(args=(), local_folders=(), network=False))
        # The sandbox sees the system's and the agent's Python folders; uv may be
        # elsewhere (a user's installation), so its folder is bound too.
        read_only = (os.path.dirname(os.path.realpath(uv)), *plan.local_folders)
        # No network of its own: a remote index is reached through the agent's index
        # proxy only (platform/sandbox/index_access.py).
        tool = ToolRun(
            argv=(uv, *args, *plan.args, "--no-config", "--quiet"), uid=uid,
            writable=(str(work), str(cache)), read_only=read_only, network="none",
            # A remote index is trusted through the machine's certificate store (the
            # sandbox binds /etc/ssl): an operator's TLS proxy's CA is there. Both
            # names: UV_SYSTEM_CERTS for current uv, UV_NATIVE_TLS for older ones.
            env={"UV_CACHE_DIR": str(cache), "UV_NO_PROGRESS": "1", "HOME": "/tmp",
                 "UV_PYTHON_DOWNLOADS": "never", "UV_SYSTEM_CERTS": "1",
                 "UV_NATIVE_TLS": "1"},
            workdir=str(work), timeout=self.settings.build_timeout,
            max_output=MAX_TOOL_OUTPUT)
        refused: tuple[str, ...] = ()
        if plan.network:
            async with index_access(tool, self.settings.allowance()) as (proxied, proxy):
                code, output = await self.run_tool(proxied)
                refused = tuple(proxy.refusals)
        else:
            code, output = await self.run_tool(tool)
        if code != 0:
            why = output.strip() or f"uv exited with status {code}"
            if refused:
                why += f" (the index proxy refused: {'; '.join(dict.fromkeys(refused[-3:]))})"
            raise InstanceFailed(f"{what} failed: {why}")

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1

    def _workdir(self, what: str) -> Path:
        """A staging folder only the builder may write (blocking)."""
        work = self.root / f".{what}-{uuid.uuid4().hex[:8]}"
        _owned_folder(work, self.settings.builder_uid)
        return work

    # ---- using and listing ---------------------------------------------------------

    def get(self, key: str) -> Environment | None:
        """The built environment `key`, None if this node has none (blocking)."""
        try:
            record = json.loads((self.root / key / RECORD).read_text())
            return Environment(key=key, path=self.root / key, python=record["python"],
                               platform=record["platform"], lock=record["lock"],
                               source=record.get("source", ""),
                               packages=int(record["packages"]),
                               size_bytes=int(record["size_bytes"]),
                               base_prefix=_venv_base_prefix(self.root / key))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def python_env(self, env: Environment) -> PythonEnv:
        """How a launch runs in `env` (no disk access)."""
        runtime = self.runtime_path()
        paths = (str(env.path), env.base_prefix, runtime)
        minor = ".".join(env.python.split(".")[:2])
        return PythonEnv(key=env.key, python=str(env.path / "bin" / "python"),
                         paths=tuple(p for p in paths if p), runtime_path=runtime,
                         version=env.python,
                         site_packages=str(env.path / "lib" / f"python{minor}" / "site-packages"))

    def runtime_path(self) -> str:
        """A folder holding a copy of the thaw runtime package only (it imports the
        standard library alone), made once per agent start from the agent's own."""
        if self._runtime_path is None:
            import thaw.snapshotter.runtime as runtime

            target = self.root / f".runtime-{uuid.uuid4().hex[:8]}"
            package = target / "thaw" / "snapshotter"
            shutil.copytree(Path(runtime.__path__[0]), package / "runtime",
                            ignore=shutil.ignore_patterns("__pycache__"))
            (package / "__init__.py").write_text("")
            # The `thaw` package's own names (`from thaw import Input`), read lazily from
            # the runtime copied beside them.
            shutil.copyfile(public_names_file(), target / "thaw" / "__init__.py")
            _seal(target)
            for old in self.root.glob(".runtime-*"):
                if old != target:
                    _remove(old)
            self._runtime_path = str(target)
        return self._runtime_path

    def touch(self, key: str, function: str) -> None:
        """Note that `function` uses environment `key` now (`thaw env ls`)."""
        if function:
            self.users.setdefault(key, set()).add(function)
        self._last_used[key] = time.time()

    def _mark_used(self, key: str) -> None:
        with contextlib.suppress(OSError):
            (self.root / ".used" / key).touch()

    def listing(self) -> list[ListedEnvironment]:
        """Every environment of the node, with the functions that used it since the
        agent started and when it was last used (blocking)."""
        found: list[ListedEnvironment] = []
        for path in sorted(self.root.iterdir()):
            env = None if path.name.startswith(".") else self.get(path.name)
            if env is None:
                continue
            try:
                used = (self.root / ".used" / env.key).stat().st_mtime
            except OSError:
                used = 0.0
            used = max(used, self._last_used.get(env.key, 0.0))
            found.append(ListedEnvironment(env, tuple(sorted(self.users.get(env.key, ()))),
                                           used))
        return found

    def collect(self, keep: set[str]) -> dict[str, int]:
        """Remove every environment whose key is not in `keep` (those in use) and not
        being built, what failed builds left and uv's download cache; returns the keys
        removed and the bytes each held (blocking)."""
        building = self._running > 0 or any(lock.locked() for lock in self._building.values())
        removed: dict[str, int] = {}
        for path in list(self.root.iterdir()):
            name = path.name
            if name.startswith(STAGING_PREFIXES):
                if not building:
                    _remove(path)
                continue
            if name.startswith(".") or name in keep:
                continue
            lock = self._building.get(name)
            if lock is not None and lock.locked():
                continue
            env = self.get(name)
            _remove(path)
            with contextlib.suppress(OSError):
                (self.root / ".used" / name).unlink()
            self.users.pop(name, None)
            self._known.pop(name, None)
            self._last_used.pop(name, None)
            removed[name] = env.size_bytes if env is not None else 0
        if not building:
            # uv's download cache only speeds up builds (environments hold copies):
            # without one running, it goes too, so it never grows without bound.
            _remove(self.root / ".uv-cache")
        if removed:
            log.info("environments collected", keys=sorted(removed))
        return removed


def uv_program() -> str:
    """The uv binary installed with thaw (the `uv` package), else the one on PATH."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise InstanceFailed("uv is not installed on this node: per-function "
                                 "environments are built with it") from None
        return found


def _record(env: Environment) -> dict[str, object]:
    return {"key": env.key, "python": env.python, "platform": env.platform,
            "lock": env.lock, "source": env.source, "packages": env.packages,
            "size_bytes": env.size_bytes}


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _write_atomically(path: Path, text: str) -> None:
    staged = path.with_suffix(f".{uuid.uuid4().hex[:6]}")
    staged.write_text(text)
    os.replace(staged, path)


def _owned_folder(path: Path, uid: int) -> None:
    path.mkdir(mode=0o755, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, uid, uid)


def _venv_config(env_dir: Path) -> dict[str, str]:
    config = {}
    with contextlib.suppress(OSError):
        for line in (env_dir / "pyvenv.cfg").read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep:
                config[name.strip()] = value.strip()
    return config


def _venv_version(env_dir: Path) -> str:
    """The interpreter's version from pyvenv.cfg, never by running it: the .pth files
    of the environment's packages would run outside any sandbox."""
    return _venv_config(env_dir).get("version_info", "")


def _venv_base_prefix(env_dir: Path) -> str:
    """The installation the environment was made from (pyvenv.cfg's home is its bin)."""
    home = _venv_config(env_dir).get("home", "")
    return os.path.realpath(os.path.dirname(home)) if home else ""


def _folder_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _seal(path: Path) -> None:
    """Owned by the agent and read-only for everyone: readable and, for folders and
    programs, searchable or runnable by tenant uids."""
    uid, gid = os.geteuid(), os.getegid()
    for dirpath, dirs, files in os.walk(path, topdown=False):
        for name in [*dirs, *files]:
            _seal_one(os.path.join(dirpath, name), uid, gid)
    _seal_one(str(path), uid, gid)


def _seal_one(full: str, uid: int, gid: int) -> None:
    st = os.lstat(full)
    if os.path.islink(full):
        os.lchown(full, uid, gid)
        return
    os.chown(full, uid, gid)
    runnable = os.path.isdir(full) or st.st_mode & 0o111
    os.chmod(full, 0o555 if runnable else 0o444)


def _remove(path: Path) -> None:
    """Remove a folder, also one made read-only by _seal."""
    if not path.is_dir() or path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    for dirpath, dirs, _files in os.walk(path):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(dirpath, name), 0o755)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o755)
    shutil.rmtree(path, ignore_errors=True)
