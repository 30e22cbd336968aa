"""Garbage collection of a node's files: bundles no kept version and no live process
uses, unpack (staging) folders and build outputs no request is writing, and the logs
of instances that ended more than an age ago. (Snapshot chunks, templates and pinned
copies are collected by `Agent.collect_garbage`; the RPC edge runs both.)

The scheduler says which bundles to keep (the versions it keeps, the instances it
runs); the node adds what it knows is in use now: the bundles and builds of requests
in flight (`InFlight`, held by the RPC edge around every request that reads a bundle)
and the folders and files its live instances and templates have open. Each kind is
chosen by a pure function of names, ages and what is in use; the chosen entries are
moved into a trash folder on the event loop, the in-flight check repeated right
before with no await in between (a start that arrives later finds no bundle and
extracts it again rather than losing it half-way), and deleted in a thread.

Layout under the agent's home: bundles/<digest>/ and bundles/.<digest>-<tag>/
(Agent.ensure_bundle), builds/<tenant uid>/<build id>/ and builds/.sealed/<build id>/
(Agent.build_snapshot), logs/<tenant uid>/<instance id>.log, build-<key>.log,
template-<tenant>-<name>.log. Calls' own lines are kept in the agent's memory, not in
files; `select_call_logs` is their retention (platform/calllogs.py applies it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger()

# The kinds a collection reports, in this order (GarbageFreed.kind).
CHUNKS, BUNDLES, STAGING, BUILDS, LOGS = "chunks", "bundles", "staging", "builds", "logs"
FILE_KINDS = (BUNDLES, STAGING, BUILDS, LOGS)
# Where chosen entries wait for deletion: on the home's filesystem (a rename), hidden
# from every lookup by name.
TRASH = ".gc-trash"
# Build outputs moved out of the tenant's reach (platform/agent.py SEALED_BUILDS).
SEALED_BUILDS = ".sealed"
LOG_SUFFIX = ".log"
BUILD_LOG_PREFIX = "build-"


def build_key(tenant: str, name: str, version: str) -> str:
    """What a build's output folders start with (`<key>-<tag>`) and its log is named
    after (`build-<key>.log`), as Agent.build_snapshot names them."""
    return f"{tenant}-{name}-{version}"


@dataclass(frozen=True)
class GcPolicy:
    """What the scheduler asks of one collection."""

    keep_bundles: frozenset[str]
    """Digests of the bundles that kept versions and live instances use."""
    log_max_age: float
    """Seconds an ended instance's log is kept (0: collected once nothing uses it)."""


@dataclass
class Freed:
    kind: str
    items: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class LogFile:
    path: Path
    mtime: float


@dataclass(frozen=True)
class InUse:
    """What this node's live instances and templates use, from /proc."""

    places: frozenset[str] = frozenset()
    """Their working folders and the roots of their mounts."""
    open_files: frozenset[str] = frozenset()


class InFlight:
    """Bundles and builds that requests to this agent use right now."""

    def __init__(self) -> None:
        self._bundles: Counter[str] = Counter()
        self._builds: Counter[str] = Counter()

    @contextlib.contextmanager
    def using(self, digest: str, build: str = "") -> Iterator[None]:
        """Hold `digest` (and the build `build`, a build_key) for the block."""
        self._bundles[digest] += 1
        if build:
            self._builds[build] += 1
        try:
            yield
        finally:
            self._bundles[digest] -= 1
            if not self._bundles[digest]:
                del self._bundles[digest]
            if build:
                self._builds[build] -= 1
                if not self._builds[build]:
                    del self._builds[build]

    @property
    def bundles(self) -> frozenset[str]:
        return frozenset(self._bundles)

    @property
    def builds(self) -> frozenset[str]:
        return frozenset(self._builds)


# ---- selection: pure functions of names, ages and what is in use ---------------------

def staging_digest(name: str) -> str:
    """The digest of an unpack folder `.<digest>-<tag>` ("" for any other name)."""
    if not name.startswith(".") or "-" not in name:
        return ""
    return name[1:].rsplit("-", 1)[0]


def select_staging(names: Iterable[str], extracting: Collection[str]) -> list[str]:
    """Unpack folders of bundles no request is extracting: left by a crash or a lost
    race (a finished extraction renames its folder to the digest)."""
    return [n for n in names
            if staging_digest(n) and staging_digest(n) not in extracting and n != TRASH]


def bundle_in_use(digest: str, in_use: InUse) -> bool:
    """Does a live process work in, or mount, this bundle's folder?"""
    mark = f"/bundles/{digest}"
    return any(p.endswith(mark) or f"{mark}/" in p for p in in_use.places)


def select_bundles(names: Iterable[str], keep: Collection[str], in_flight: Collection[str],
                   in_use: InUse) -> list[str]:
    """Unpacked bundles that no kept version, request in flight or live process uses."""
    return [n for n in names if not n.startswith(".") and n not in keep
            and n not in in_flight and not bundle_in_use(n, in_use)]


def select_builds(names: Iterable[str], building: Collection[str]) -> list[str]:
    """Build output folders of no build in flight: each build removes its own when it
    ends, so these were left by an agent that died during a build."""
    return [n for n in names if not n.startswith(".")
            and not any(n.startswith(f"{key}-") for key in building)]


def log_open(path: Path, in_use: InUse) -> bool:
    """Is the log open in a live process? Sandboxes bind the tenant's log folder at
    its own path; compare the tail (`logs/<uid>/<name>`) to be sure."""
    tail = "/" + "/".join(path.parts[-3:])
    return any(f == str(path) or f.endswith(tail) for f in in_use.open_files)


def select_logs(logs: Iterable[LogFile], *, live: Collection[str], building: Collection[str],
                in_use: InUse, last_live: dict[str, float], now: float,
                max_age: float) -> list[Path]:
    """Logs of instances that are not running and ended more than `max_age` ago, and
    of builds and templates that ended as long ago. An instance's end is its log's last
    change or, later, the last collection that saw it live (`last_live`, updated here:
    path -> time); a log a live process holds open is in use, whatever its name."""
    chosen: list[Path] = []
    for entry in logs:
        key = str(entry.path)
        name = entry.path.name
        stem = name.removesuffix(LOG_SUFFIX)
        if stem in live:
            last_live[key] = now
            continue
        if log_open(entry.path, in_use):
            last_live[key] = now
            continue
        if name.startswith(BUILD_LOG_PREFIX) and stem[len(BUILD_LOG_PREFIX):] in building:
            continue
        ended = max(entry.mtime, last_live.get(key, 0.0))
        if now - ended >= max_age:
            chosen.append(entry.path)
    return chosen


@dataclass(frozen=True)
class CallLogEntry:
    """One call's kept lines, as the per-call log retention sees them."""

    request: str
    last_time: float
    """When the call last printed (or its lines were truncated)."""
    bytes: int


def select_call_logs(calls: Iterable[CallLogEntry], *, now: float, max_age: float,
                     max_bytes: int) -> list[str]:
    """The calls of one function whose lines go (platform/calllogs.py): those that last
    printed more than `max_age` ago, then the oldest until the rest hold at most
    `max_bytes`. Returns their request ids."""
    ordered = sorted(calls, key=lambda c: c.last_time)
    chosen = [c.request for c in ordered if now - c.last_time > max_age]
    kept = [c for c in ordered if now - c.last_time <= max_age]
    total = sum(c.bytes for c in kept)
    for c in kept:
        if total <= max_bytes:
            break
        chosen.append(c.request)
        total -= c.bytes
    return chosen


# ---- the node's side: listing, /proc, trash -----------------------------------------

def _names(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


def _subfolders(folder: Path) -> list[Path]:
    return [folder / n for n in _names(folder) if (folder / n).is_dir()
            and not (folder / n).is_symlink()]


def list_logs(logs_root: Path) -> list[LogFile]:
    """Every `*.log` in each tenant's log folder (never following a link)."""
    found = []
    for tenant in _subfolders(logs_root):
        for name in _names(tenant):
            if not name.endswith(LOG_SUFFIX):
                continue
            with contextlib.suppress(OSError):
                info = os.lstat(tenant / name)
                found.append(LogFile(tenant / name, info.st_mtime))
    return found


def process_usage(pids: Iterable[int], proc: Path = Path("/proc")) -> InUse:
    """The working folders, mount roots and open files of these processes (a process
    that is gone or unreadable adds nothing). Blocking: call from a thread."""
    places: set[str] = set()
    files: set[str] = set()
    for pid in set(pids):
        if pid <= 0:
            continue
        base = proc / str(pid)
        with contextlib.suppress(OSError):
            places.add(os.readlink(base / "cwd"))
        with contextlib.suppress(OSError):
            for line in (base / "mountinfo").read_text().splitlines():
                fields = line.split()
                if len(fields) > 3:
                    places.add(fields[3])
        with contextlib.suppress(OSError):
            for fd in os.listdir(base / "fd"):
                with contextlib.suppress(OSError):
                    files.add(os.readlink(base / "fd" / fd))
    return InUse(frozenset(places), frozenset(files))


def disk_bytes(path: Path) -> int:
    """Bytes a file or folder tree takes on disk (allocated blocks, links not followed)."""
    try:
        info = os.lstat(path)
    except OSError:
        return 0
    total = info.st_blocks * 512
    if not os.path.isdir(path) or os.path.islink(path):
        return total
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _delete(path: Path) -> int:
    size = disk_bytes(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return size


@dataclass(frozen=True)
class _Chosen:
    kind: str
    path: Path


class NodeCollector:
    """Collects one agent's files. `live_pids` and `live_instances` read the agent's
    instances and templates; `in_flight` is held by the RPC edge."""

    def __init__(self, home: Path, *, in_flight: InFlight,
                 live_instances: Callable[[], Collection[str]],
                 live_pids: Callable[[], Iterable[int]],
                 clock: Callable[[], float] = time.time) -> None:
        self.home = home
        self.in_flight = in_flight
        self.live_instances = live_instances
        self.live_pids = live_pids
        self.clock = clock
        self.last_live: dict[str, float] = {}
        """Log path -> when a collection last saw its instance live or its file open."""
        self._lock = asyncio.Lock()

    async def collect(self, policy: GcPolicy) -> list[Freed]:
        """One pass over every kind of file; returns what each freed."""
        async with self._lock:  # two passes at once would count the same entries
            in_use = await asyncio.to_thread(process_usage, list(self.live_pids()))
            # Read on the loop: the agent changes these there.
            live, extracting, building = (frozenset(self.live_instances()),
                                          self.in_flight.bundles, self.in_flight.builds)
            chosen = await asyncio.to_thread(self._choose, policy, in_use, live,
                                             extracting, building)
            trash = self.home / TRASH
            await asyncio.to_thread(trash.mkdir, exist_ok=True)
            moved = self._move(chosen, trash)
            # What an earlier pass moved and did not delete (the agent died) goes too.
            moved += [(_trash_kind(n), trash / n)
                      for n in await asyncio.to_thread(_names, trash)
                      if trash / n not in {path for _k, path in moved}]
            freed = {kind: Freed(kind) for kind in FILE_KINDS}
            for kind, path in moved:
                size = await asyncio.to_thread(_delete, path)
                freed[kind].items += 1
                freed[kind].bytes += size
        result = [freed[k] for k in FILE_KINDS]
        log.info("node files collected", **{f.kind: f.bytes for f in result},
                 items=sum(f.items for f in result))
        return result

    def _choose(self, policy: GcPolicy, in_use: InUse, live: frozenset[str],
                extracting: frozenset[str], building: frozenset[str]) -> list[_Chosen]:
        """Blocking: the listing and the choice."""
        home = self.home
        bundles = _names(home / "bundles")
        chosen = [_Chosen(STAGING, home / "bundles" / n)
                  for n in select_staging(bundles, extracting)]
        chosen += [_Chosen(BUNDLES, home / "bundles" / n)
                   for n in select_bundles(bundles, policy.keep_bundles, extracting, in_use)]
        build_folders = [*_subfolders(home / "builds"), home / "builds" / SEALED_BUILDS]
        for folder in dict.fromkeys(build_folders):
            chosen += [_Chosen(BUILDS, folder / n)
                       for n in select_builds(_names(folder), building)]
        logs = list_logs(home / "logs")
        chosen += [_Chosen(LOGS, path) for path in select_logs(
            logs, live=live, building=building, in_use=in_use, last_live=self.last_live,
            now=self.clock(), max_age=policy.log_max_age)]
        existing = {str(entry.path) for entry in logs}
        for key in [k for k in self.last_live if k not in existing]:
            del self.last_live[key]
        return chosen

    def _still_garbage(self, entry: _Chosen) -> bool:
        """The in-flight and live checks again, as they are now."""
        name = entry.path.name
        if entry.kind == STAGING:
            return staging_digest(name) not in self.in_flight.bundles
        if entry.kind == BUNDLES:
            return name not in self.in_flight.bundles
        if entry.kind == BUILDS:
            return not any(name.startswith(f"{k}-") for k in self.in_flight.builds)
        return name.removesuffix(LOG_SUFFIX) not in self.live_instances()

    def _move(self, chosen: list[_Chosen], trash: Path) -> list[tuple[str, Path]]:
        """On the event loop, with no await: each entry checked once more, then renamed
        into the trash, so no request can start using it after the check."""
        moved = []
        for entry in chosen:
            if not self._still_garbage(entry):
                continue
            target = trash / f"{entry.kind}-{uuid.uuid4().hex[:12]}"
            try:
                os.rename(entry.path, target)
            except OSError as exc:
                if exc.errno == errno.EXDEV and entry.kind != BUNDLES:
                    moved.append((entry.kind, entry.path))  # another filesystem
                continue  # else gone meanwhile (a build removed its own output)
            self.last_live.pop(str(entry.path), None)
            moved.append((entry.kind, target))
        return moved


def _trash_kind(name: str) -> str:
    kind = name.split("-", 1)[0]
    return kind if kind in FILE_KINDS else STAGING
