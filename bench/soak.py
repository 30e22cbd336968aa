"""`thaw bench soak`: valid calls mixed with bad input against a local platform, for a
bounded time, and what it did to the platform (DESIGN.md §10).

A private local platform (its own THAW_HOME, port 0) serves two functions: the echo
bundle (examples/echo) and a small one that sums numbers. Three kinds of client run
at once for `duration` seconds:

- `concurrency` clients, each calling a valid function VALID_PER_BAD times for every
  bad input answered at once (bench/soak_inputs.py: oversized and many headers, deep
  and huge JSON on the JSON routes, webhooks to loopback, metadata and private
  addresses, bad keys);
- `slow` slow or silent connections (slowloris), each held at most `slow_hold` s
  (longer than the gateway's header_timeout_seconds, 30 by default, so that a
  connection the platform would close is seen closed);
- one deployer sending malformed bundles and bad thaw.toml values one after another.

Each kind of bad input is tried at least once, past `duration` if need be; a slow
connection starts only while it can be held to its end by `duration` (or is the first
of its kind), and every attempt is bounded by its own timeouts, so a run ends.

The service processes' RSS and open descriptors are sampled (psutil, by pid) once the
functions are deployed and warm (`start`), every second while the soak runs (`peak`),
and after it, once the bench's own connections are closed and the services' descriptors
are back to their start or SETTLE_S has passed (`end`); growth from the middle of the
soak to the end tells what keeps growing from what a first pass allocates. The goals of
a platform that holds: no 5xx (nor dropped connection) for a valid call; RSS of the
gateway and every agent grown less than RSS_GROWTH_GOAL; their descriptors not grown.
The report ends with each function's state, where an accepted bad bundle shows what it
became.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import httpx
import psutil

from thaw.bench.platform import Platform
from thaw.bench.soak_inputs import Attempt, Target, bundles, deploy, quick_kinds, slow_kinds
from thaw.core.spec import pack_bundle, parse_spec

SUM_APP = '''
class Sum:
    def __call__(self, request):
        return {"sum": sum(request.json()["numbers"])}
'''
SUM_TOML = '''
name = "soak-sum"
handler = "app:Sum"

[scaling]
max_instances = 1
target_concurrency = 16
max_concurrency = 32
scaledown_window = "600s"
'''
# Valid calls per bad input in the mixed lanes: mostly valid traffic, as in production.
VALID_PER_BAD = 3
# Seconds of valid calls before the start sample: connections, leases and caches made
# once are not growth.
WARMUP_S = 3.0
# Longest wait after the soak for the services' descriptors to come back to the start.
SETTLE_S = 15.0
SAMPLE_INTERVAL_S = 1.0
# Least time between two deploys of the deployer: an accepted bad bundle builds.
DEPLOY_INTERVAL_S = 1.0
RSS_GROWTH_GOAL = 0.10
VALID_TIMEOUT_S = 60.0
ERROR_PAUSE_S = 0.1
# Bad input comes from another loopback address than the valid calls (all of 127/8
# is the loopback interface on Linux), as an attacker's would.
BAD_SOURCE = "127.0.0.2"


class SoakPlatform(Platform, Protocol):
    """A platform whose service processes the soak can watch."""

    function_url: str
    procs: list[tuple[str, subprocess.Popen[bytes]]]


class SoakPlatformFactory(Protocol):
    def __call__(self, home: Path, host_devices: str) -> SoakPlatform: ...


Sampler = Callable[[int], tuple[int, int]]
"""pid -> (RSS in bytes, open file descriptors)."""


def sample_process(pid: int) -> tuple[int, int]:
    proc = psutil.Process(pid)
    return proc.memory_info().rss, proc.num_fds()


@dataclass
class _Tally:
    valid: Counter[str] = field(default_factory=Counter)
    valid_errors: Counter[str] = field(default_factory=Counter)
    """Valid calls not answered 200: "<status> <error code>" (the gateway's JSON error)."""
    valid_by_function: dict[str, Counter[str]] = field(default_factory=dict)
    bad: dict[str, Counter[str]] = field(default_factory=dict)

    def bad_result(self, kind: str, status: str) -> None:
        self.bad.setdefault(kind, Counter())[status] += 1

    def valid_result(self, function: str, status: str) -> None:
        self.valid[status] += 1
        self.valid_by_function.setdefault(function, Counter())[status] += 1


@dataclass
class _Watch:
    """Samples of each watched service: name -> pid, and what was measured."""

    sampler: Sampler
    pids: dict[str, int]
    start: dict[str, tuple[int, int]] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    mid: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Halfway through the soak: growth from here to the end is what keeps growing
    (a leak), not what a first pass through new code paths allocates once."""
    end: dict[str, tuple[int, int]] = field(default_factory=dict)

    def take(self) -> dict[str, tuple[int, int]]:
        taken = {}
        for name, pid in self.pids.items():
            try:
                taken[name] = self.sampler(pid)
            except psutil.Error:
                continue  # it died: `alive` says so
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), taken[name][0])
        return taken


def _error_code(body: bytes) -> str:
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "-"
    return str(code)


class _Valid:
    """The valid calls: each function with a payload and the answer it must give."""

    def __init__(self, session: aiohttp.ClientSession, base: str, tenant: str,
                 echo: str) -> None:
        self.session = session
        self.base = base
        self.tenant = tenant
        self.echo = echo
        self.turn = 0

    async def call(self, tally: _Tally) -> None:
        self.turn += 1
        n = self.turn
        payload: dict[str, object]
        expect: tuple[str, object]
        if n % 2:
            name, payload, expect = self.echo, {"n": n}, ("echo", {"n": n})
        else:
            name, payload, expect = "soak-sum", {"numbers": [n, 1, 2]}, ("sum", n + 3)
        try:
            async with self.session.post(f"{self.base}/fn/{self.tenant}/{name}",
                                         json=payload) as resp:
                status = str(resp.status)
                if resp.status == 200:
                    body = await resp.json(content_type=None)
                    if not isinstance(body, dict) or body.get(expect[0]) != expect[1]:
                        status = "200_wrong_answer"
                else:
                    tally.valid_errors[f"{status} {_error_code(await resp.read())}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = f"error_{type(exc).__name__}"
            # A gateway that is down refuses at once: do not spin on the shared cores.
            await asyncio.sleep(ERROR_PAUSE_S)
        tally.valid_result(name, status)


async def _mixed_lane(valid: _Valid, kinds: dict[str, Attempt], target: Target,
                      tally: _Tally, deadline: float, schedule: itertools.cycle[str],
                      tried: set[str]) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < deadline or tried != set(kinds):
        for _ in range(VALID_PER_BAD):
            await valid.call(tally)
        kind = next(schedule)
        tried.add(kind)
        tally.bad_result(kind, await kinds[kind](target))


async def _serial_lane(kinds: dict[str, Attempt], target: Target, tally: _Tally,
                       deadline: float, tried: set[str], *, gap: float = 0.0,
                       reserve: float = 0.0, start: int = 0) -> None:
    """One kind after another, from `start` in the order of `kinds`, at least `gap`
    seconds apart. Kinds no lane sharing `tried` has tried yet go first, whatever the
    time; after them a new attempt starts only when it can end by the deadline
    (`reserve`: the longest one attempt takes)."""
    loop = asyncio.get_running_loop()
    order = list(kinds)
    order = order[start % len(order):] + order[:start % len(order)]
    for turn in itertools.count():
        untried = [k for k in order if k not in tried]
        if untried:
            kind = untried[0]
        elif loop.time() + reserve < deadline:
            kind = order[turn % len(order)]
        else:
            return
        tried.add(kind)
        began = loop.time()
        tally.bad_result(kind, await kinds[kind](target))
        await asyncio.sleep(max(0.0, gap - (loop.time() - began)))


async def _sampling(watch: _Watch, stop: asyncio.Event, midpoint: float) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        taken = await asyncio.to_thread(watch.take)
        if not watch.mid and loop.time() >= midpoint:
            watch.mid = taken
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)


async def _settle(watch: _Watch) -> float:
    """Wait (at most SETTLE_S) until no service holds more descriptors than at start;
    the seconds waited."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    while loop.time() - began < SETTLE_S:
        now = await asyncio.to_thread(watch.take)
        if all(now[n][1] <= watch.start[n][1] for n in now if n in watch.start):
            break
        await asyncio.sleep(0.5)
    watch.end = await asyncio.to_thread(watch.take)
    return loop.time() - began


@dataclass(frozen=True)
class SoakSettings:
    duration: float = 120.0
    concurrency: int = 8
    slow: int = 8
    slow_hold: float = 45.0


async def _soak(target: Target, settings: SoakSettings, watch: _Watch,
                tally: _Tally) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    quick = quick_kinds()
    deploys = {kind: deploy(tarball) for kind, tarball in bundles().items()}
    connector = aiohttp.TCPConnector(limit=settings.concurrency)
    async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=VALID_TIMEOUT_S),
            headers={"Authorization": f"Bearer {target.key}"}) as session:
        valid = _Valid(session, f"http://{target.host}:{target.function_port}",
                       target.tenant, target.function)
        warm_until = loop.time() + WARMUP_S
        warm = _Tally()

        async def warm_lane() -> None:
            while loop.time() < warm_until:
                await valid.call(warm)
        await asyncio.gather(*(warm_lane() for _ in range(settings.concurrency)))
        watch.start = await asyncio.to_thread(watch.take)
        stop = asyncio.Event()
        began = loop.time()
        deadline = began + settings.duration
        sampler = asyncio.create_task(_sampling(watch, stop, began + settings.duration / 2))
        schedule, tried = itertools.cycle(quick), set[str]()
        slow, slow_tried = slow_kinds(settings.slow_hold), set[str]()
        try:
            await asyncio.gather(
                *(_mixed_lane(valid, quick, target, tally, deadline, schedule, tried)
                  for _ in range(settings.concurrency)),
                *(_serial_lane(slow, target, tally, deadline, slow_tried,
                               reserve=settings.slow_hold, start=i)
                  for i in range(settings.slow)),
                _serial_lane(deploys, target, tally, deadline, set(),
                             gap=DEPLOY_INTERVAL_S))
        finally:
            stop.set()
            await sampler
        elapsed = loop.time() - began
    settle = await _settle(watch)
    return {"elapsed_s": elapsed, "settle_s": settle}


def _is_5xx(status: str) -> bool:
    return len(status) == 3 and status.startswith("5")


def _refused(kind: str, outcomes: Counter[str]) -> bool:
    """A bad input is refused when every attempt was answered 4xx; a slow client may
    instead be answered 408 or closed."""
    ok = {"408", "closed"} if kind.startswith("slow_") else set()
    return all(s in ok or (len(s) == 3 and s.startswith("4")) for s in outcomes)


def report(settings: SoakSettings, times: dict[str, float], tally: _Tally, watch: _Watch,
           alive: dict[str, bool]) -> dict[str, Any]:
    valid_total = sum(tally.valid.values())
    bad_by_status: Counter[str] = Counter()
    for outcomes in tally.bad.values():
        bad_by_status.update(outcomes)
    bad_total = sum(bad_by_status.values())
    answered = sum(n for s, n in (tally.valid + bad_by_status).items() if s.isdigit())
    services: dict[str, dict[str, Any]] = {}
    for name in watch.pids:
        if name not in watch.start or name not in watch.end:
            services[name] = {"alive": alive.get(name, False), "measured": False}
            continue
        (rss0, fds0), (rss1, fds1) = watch.start[name], watch.end[name]
        services[name] = {"alive": alive.get(name, False), "measured": True,
                          "rss_start_bytes": rss0, "rss_end_bytes": rss1,
                          "rss_peak_bytes": watch.peak_rss[name],
                          "rss_mid_bytes": watch.mid[name][0] if name in watch.mid else None,
                          "rss_growth_second_half": (
                              round((rss1 - watch.mid[name][0]) / watch.mid[name][0], 4)
                              if name in watch.mid else None),
                          "rss_growth": round((rss1 - rss0) / rss0, 4),
                          "fds_start": fds0, "fds_end": fds1, "fds_growth": fds1 - fds0}
    judged = [n for n in services if n == "gateway" or n.startswith("agent")]
    valid_5xx = sum(n for s, n in tally.valid.items() if _is_5xx(s))
    valid_dropped = sum(n for s, n in tally.valid.items() if s.startswith("error_"))
    wrong = tally.valid.get("200_wrong_answer", 0)
    rss_growth = {n: services[n].get("rss_growth") for n in judged}
    fds_growth = {n: services[n].get("fds_growth") for n in judged}
    return {
        "duration_s": settings.duration,
        "elapsed_s": round(times["elapsed_s"], 2),
        "settle_s": round(times["settle_s"], 2),
        "concurrency": settings.concurrency,
        "slow_connections": settings.slow,
        "slow_hold_s": settings.slow_hold,
        "calls": {"sent": valid_total + bad_total, "answered": answered,
                  "valid": valid_total, "bad": bad_total},
        "valid": {"by_status": dict(tally.valid), "errors": dict(tally.valid_errors),
                  "served_fraction": round(tally.valid.get("200", 0) / max(valid_total, 1), 4),
                  "by_function": {f: dict(c) for f, c in tally.valid_by_function.items()}},
        "bad": {"by_status": dict(bad_by_status),
                "by_kind": {k: dict(c) for k, c in sorted(tally.bad.items())},
                "refused": {k: _refused(k, c) for k, c in sorted(tally.bad.items())}},
        "services": services,
        "goals": {
            "valid_no_5xx": {"ok": valid_5xx == 0 and valid_dropped == 0 and wrong == 0,
                             "5xx": valid_5xx, "dropped": valid_dropped,
                             "wrong_answer": wrong},
            "rss_growth_under_10pct": {
                "ok": all(g is not None and g < RSS_GROWTH_GOAL for g in rss_growth.values()),
                "growth": rss_growth},
            "no_fd_growth": {"ok": all(g is not None and g <= 0 for g in fds_growth.values()),
                             "growth": fds_growth},
            "services_alive": {"ok": all(alive.values()), "alive": alive},
        },
    }


def _deploy_valid(http: httpx.Client, folder: Path) -> None:
    resp = http.post("/v1/functions", params={"wait": "true"},
                     content=pack_bundle(str(folder)))
    if resp.status_code != 201 or resp.json().get("state") != "ready":
        raise RuntimeError(f"{folder} did not deploy: {resp.status_code} {resp.text}")


def run_soak_bench(echo: str = "examples/echo", settings: SoakSettings | None = None, *,
                   platform: SoakPlatformFactory,
                   sampler: Sampler = sample_process) -> dict[str, Any]:
    settings = settings or SoakSettings()
    echo_dir = Path(echo).resolve()
    echo_name = parse_spec((echo_dir / "thaw.toml").read_text()).name
    with tempfile.TemporaryDirectory(prefix="thaw-soak-") as tmp:
        sum_dir = Path(tmp) / "sum"
        sum_dir.mkdir()
        (sum_dir / "app.py").write_text(SUM_APP)
        (sum_dir / "thaw.toml").write_text(SUM_TOML)
        local = platform(Path(tmp) / "home", "2x8GiB")
        local.start()
        try:
            with httpx.Client(base_url=local.url, timeout=600,
                              headers={"Authorization": f"Bearer {local.key}"}) as http:
                _deploy_valid(http, echo_dir)
                _deploy_valid(http, sum_dir)
            api, fn = urlsplit(local.url), urlsplit(local.function_url or local.url)
            host = api.hostname or "127.0.0.1"
            target = Target(host=host, api_port=api.port or 80, function_port=fn.port or 80,
                            key=local.key, tenant="dev", function=echo_name,
                            source=BAD_SOURCE if host == "127.0.0.1" else None)
            watch = _Watch(sampler, {name: proc.pid for name, proc in local.procs})
            tally = _Tally()
            times = asyncio.run(_soak(target, settings, watch, tally))
            alive = {name: proc.poll() is None for name, proc in local.procs}
            functions = _functions(local)
        finally:
            local.stop()
    out = report(settings, times, tally, watch, alive)
    out["functions"] = functions
    return out


def _functions(local: SoakPlatform) -> dict[str, dict[str, Any]] | None:
    """Each function's state and warm instances after the soak: what an accepted bad
    bundle became (None when the gateway no longer answers)."""
    try:
        resp = httpx.get(f"{local.url}/v1/functions", timeout=30,
                         headers={"Authorization": f"Bearer {local.key}"})
        listed = resp.json()["functions"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return {fn["name"]: {"state": fn["state"], "warm_instances": fn["warm_instances"]}
            for fn in listed}
