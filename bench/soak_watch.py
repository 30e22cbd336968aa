"""What `thaw bench soak` measures of the platform's service processes: RSS, open
descriptors (each one described, by kind), and what the heap holds (bench/soak_probe.py).

A sample is taken every second while the soak runs (RSS and a descriptor count), and
fully (every descriptor described, the heap probed) at the two quiet points compared:
after the warm-up and after the soak, each once the bench's own connections are closed
and the services' descriptors have settled.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from thaw.bench.soak_probe import SIGNAL

# How long a service has to answer the heap probe (it collects garbage first).
PROBE_TIMEOUT_S = 10.0
# Figures of the heap a leak makes grow, in the order reported.
HEAP_FIGURES = ("gc_objects", "allocated_blocks", "malloc_in_use_bytes", "traced_bytes")
# Types reported by how many more objects of them the heap holds at the end.
TYPES_REPORTED = 10
# Descriptors listed by name when they appeared (or went) between the two samples, and
# modules listed by name when imported between two probes.
FDS_LISTED = 20
MODULES_LISTED = 20
_SOCKET_TABLES = ("tcp", "tcp6", "udp", "udp6", "unix")
_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
               "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
               "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


@dataclass(frozen=True)
class Sample:
    rss: int
    fds: int
    links: tuple[str, ...] | None = None
    """Each open descriptor described (`kind` then what it is), when asked for; `fds`
    is then their number."""


Sampler = Callable[[int, bool], Sample]
"""(pid, describe descriptors) -> Sample."""


def _hex_address(text: str) -> str:
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    if len(raw) == 4:
        host = ".".join(str(b) for b in reversed(raw))
    else:  # IPv6: four 32-bit words, each in host (little-endian) order
        words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
        host = ":".join(b"".join(words)[i:i + 2].hex() for i in range(0, 16, 2))
    return f"{host}:{int(port, 16)}"


def socket_table(pid: int) -> dict[str, str]:
    """Socket inode -> `kind local->remote STATE` (or `unix path`), for the sockets of
    the network namespace `pid` sees."""
    table: dict[str, str] = {}
    for kind in _SOCKET_TABLES:
        try:
            lines = Path(f"/proc/{pid}/net/{kind}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if kind == "unix":
                if len(cols) >= 7:
                    table[cols[6]] = f"unix {cols[7] if len(cols) > 7 else '(unnamed)'}"
                continue
            if len(cols) < 10:
                continue
            state = _TCP_STATES.get(cols[3], cols[3]) if kind.startswith("tcp") else ""
            table[cols[9]] = (f"{kind} {_hex_address(cols[1])}->{_hex_address(cols[2])}"
                              f" {state}").rstrip()
    return table


def describe_link(target: str, sockets: dict[str, str]) -> str:
    """One descriptor's readlink target as `kind what`: a socket by its table entry, a
    pipe, an anonymous inode (eventfd, epoll, inotify...), a memfd, a device or a file."""
    if target.startswith("socket:["):
        return sockets.get(target[8:-1], "socket other")
    if target.startswith("pipe:["):
        return "pipe"
    if target.startswith("anon_inode:"):
        return f"anon_inode {target[11:].strip('[]')}"
    if target.startswith("/memfd:"):
        return f"memfd {target[7:]}"
    if target.startswith("/dev/"):
        return f"device {target}"
    return f"file {target}"


def fd_kind(description: str) -> str:
    """The kind of a described descriptor: its first word, and an anonymous inode's
    name (`anon_inode eventfd`)."""
    words = description.split()
    return " ".join(words[:2]) if words[0] == "anon_inode" else words[0]


def list_fds(pid: int) -> tuple[str, ...]:
    """Every open descriptor of `pid`, described, in descriptor order."""
    folder = Path(f"/proc/{pid}/fd")
    sockets = socket_table(pid)
    links = []
    for name in sorted(os.listdir(folder), key=int):
        try:
            links.append(describe_link(os.readlink(folder / name), sockets))
        except FileNotFoundError:
            continue  # closed while listed
    return tuple(links)


def sample_process(pid: int, describe: bool = False) -> Sample:
    proc = psutil.Process(pid)
    rss = proc.memory_info().rss
    if not describe:
        return Sample(rss, proc.num_fds())
    try:
        links = list_fds(pid)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise psutil.NoSuchProcess(pid) from exc
    return Sample(rss, len(links), links)


def probe_heap(pid: int, folder: Path) -> dict[str, Any] | None:
    """Ask the service `pid` (started with the probe) for its heap figures; None when
    it did not answer within PROBE_TIMEOUT_S."""
    answer = folder / f"{pid}-{len(list(folder.glob(f'{pid}-*.json'))) + 1}.json"
    try:
        os.kill(pid, SIGNAL)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    while time.monotonic() < deadline:
        if answer.exists():
            figures: dict[str, Any] = json.loads(answer.read_text())
            return figures
        time.sleep(0.05)
    return None


@dataclass
class Watch:
    """Samples of each watched service: name -> pid, and what was measured."""

    sampler: Sampler
    pids: dict[str, int]
    probe_folder: Path | None = None
    """Where the services started with the heap probe answer; None: not probed."""
    ready: dict[str, Sample] = field(default_factory=dict)
    """Once the functions are deployed, before the warm-up: for the record."""
    start: dict[str, Sample] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    mid: dict[str, Sample] = field(default_factory=dict)
    """Halfway through the measured part: growth from here to the end is what keeps
    growing, not what a first pass through new code paths allocates once."""
    end: dict[str, Sample] = field(default_factory=dict)
    heap_ready: dict[str, dict[str, Any]] = field(default_factory=dict)
    heap_start: dict[str, dict[str, Any]] = field(default_factory=dict)
    heap_end: dict[str, dict[str, Any]] = field(default_factory=dict)
    functions: dict[str, Any] = field(default_factory=dict)
    """The platform's functions (state, warm instances) at `start` and at `end`."""
    warmup_used: float = 0.0
    """Seconds of the duration the warm-up took (its set part and any steps)."""
    warmup_growth: dict[str, float | None] = field(default_factory=dict)
    """The heap's growth over the warm-up's last step, per judged service."""
    at_rest: dict[str, bool] = field(default_factory=dict)
    """Whether the platform was at rest (soak.Rest) at `start` and at `end`."""

    def take(self, describe: bool = False) -> dict[str, Sample]:
        taken = {}
        for name, pid in self.pids.items():
            try:
                taken[name] = self.sampler(pid, describe)
            except psutil.Error:
                continue  # it died: `alive` says so
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), taken[name].rss)
        return taken

    def probe(self) -> dict[str, dict[str, Any]]:
        """Every service's heap figures (none when the probe is off)."""
        if self.probe_folder is None:
            return {}
        answers = {}
        for name, pid in self.pids.items():
            figures = probe_heap(pid, self.probe_folder)
            if figures is not None:
                answers[name] = figures
        return answers


async def settle(watch: Watch, until: Callable[[dict[str, Sample]], bool],
                 longest: float) -> float:
    """Sample every half second until `until` holds of the samples (at most `longest`
    seconds); the seconds waited."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    while loop.time() - began < longest:
        if until(await asyncio.to_thread(watch.take)):
            break
        await asyncio.sleep(0.5)
    return loop.time() - began


def growth(start: float, end: float) -> float:
    return round((end - start) / start, 4) if start else 0.0


def types_grown(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """The types with the most more objects in `after` than in `before`."""
    was, now = Counter(before.get("types", {})), Counter(after.get("types", {}))
    grown = Counter({t: now[t] - was[t] for t in now if now[t] > was[t]})
    return dict(grown.most_common(TYPES_REPORTED))


def modules_imported(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """How many modules were imported between two probes, and the first names."""
    new = sorted(set(after.get("modules", ())) - set(before.get("modules", ())))
    return {"count": len(new), "names": new[:MODULES_LISTED]}


def heap_report(start: dict[str, Any] | None, end: dict[str, Any] | None,
                ready: dict[str, Any] | None = None) -> dict[str, Any]:
    """One service's heap at both ends, the growth of each figure, the types whose
    objects grew the most in number and the modules imported meanwhile; with `ready`
    (before the warm-up), what the warm-up grew the same way."""
    if start is None or end is None:
        return {"measured": False}
    out: dict[str, Any] = {"measured": True}
    for key in HEAP_FIGURES:
        if start.get(key) is None or end.get(key) is None:
            continue
        out[key] = {"start": start[key], "end": end[key],
                    "growth": growth(start[key], end[key])}
        if ready is not None and ready.get(key) is not None:
            out[key]["ready"] = ready[key]
    out["types_grown"] = types_grown(start, end)
    out["modules_imported"] = modules_imported(start, end)
    if ready is not None:
        out["warmup_types_grown"] = types_grown(ready, start)
        out["warmup_modules_imported"] = modules_imported(ready, start)
    return out


def fds_report(start: Sample, end: Sample) -> dict[str, Any]:
    """Descriptors by kind at both ends, and those that appeared or went (as
    multisets of descriptions: a socket replaced by another is one of each)."""
    if start.links is None or end.links is None:
        return {}
    before, after = Counter(start.links), Counter(end.links)
    new, gone = after - before, before - after
    return {"fd_kinds_start": dict(Counter(fd_kind(d) for d in start.links)),
            "fd_kinds_end": dict(Counter(fd_kind(d) for d in end.links)),
            "fds_new": sorted(new.elements())[:FDS_LISTED],
            "fds_gone": sorted(gone.elements())[:FDS_LISTED]}

