"""`thaw bench soak`: valid calls mixed with bad input against a local platform, for a
bounded time, and what it did to the platform (DESIGN.md §10).

A private local platform (its own THAW_HOME, port 0) serves two functions: the echo
bundle (examples/echo) and a small one that sums numbers. Three kinds of client run
at once for `duration` seconds:

- `concurrency` clients (bench/soak_lanes.py), each calling a valid function
  VALID_PER_BAD times for every bad input answered at once (bench/soak_inputs.py:
  oversized and many headers, deep and huge JSON on the JSON routes, webhooks to
  loopback, metadata and private addresses, bad keys);
- `slow` slow or silent connections (slowloris), each held at most `slow_hold` s
  (longer than the gateway's header_timeout_seconds, 30 by default, so that a
  connection the platform would close is seen closed);
- one deployer sending malformed bundles and bad thaw.toml values one after another.

Each kind of bad input is tried at least once, past `duration` if need be; a slow
connection starts only while it can be held to its end by `duration` (or is the first
of its kind), and every attempt is bounded by its own timeouts, so a run ends.

The first part of the run (`warmup`: WARMUP_FRACTION of it, at least WARMUP_MIN_S,
then by WARMUP_STEP_S steps while the heap still grows, never more than half) is a
warm-up running the same mix: a service's first pass through each path imports
modules lazily, fills caches and bounded tables (the dashboard's rolling window of
calls, gateway/stats.py, at the pace of the calls) and grows malloc's arenas, once. The
services are measured (bench/soak_watch.py) at two quiet points reached the same way:
the bench's own connections closed, then `drain` seconds for the services' kept
connections to go idle and be closed (POOL_DRAIN_S: the node client's idle limit and
sweep, core/http1.py), then until their descriptor counts hold still (at most SETTLE_S
more). One comes after the warm-up (`start`: the soak then runs the same mix for the
rest of `duration`), one after the soak (`end`). At each: RSS, every open descriptor
described (kinds, and which ones appeared or went), and the heap's figures from inside
each service (bench/soak_probe.py: objects the collector tracks, pymalloc blocks,
malloc's bytes in use, modules imported), which tell a leak from a heap that is
reused. RSS and descriptors are also sampled every second (`peak`, and `mid`, halfway
through the measured part: growth from there to the end is what keeps growing). RSS
and the heap once the functions are deployed, before the warm-up (`ready`), are
reported too: what the warm-up grew. The goals of a platform that holds: no 5xx (nor
dropped connection) for a valid call; RSS of the gateway and every agent grown less
than RSS_GROWTH_GOAL from start to end; their descriptors not grown; their heap
(objects tracked, malloc's bytes in use) grown less than HEAP_GROWTH_GOAL. The report
ends with each function's state, where an accepted bad bundle shows what it became.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import httpx

from thaw.bench import soak_probe
from thaw.bench.platform import Platform, service_environment
from thaw.bench.soak_inputs import Target, bundles, deploy, quick_kinds, slow_kinds
from thaw.bench.soak_lanes import VALID_TIMEOUT_S, Tally, Valid, mixed_lane, serial_lane
from thaw.bench.soak_watch import (
    Sample,
    Sampler,
    Watch,
    fds_report,
    growth,
    heap_report,
    sample_process,
    settle,
)
from thaw.core.http1 import IDLE_SECONDS, SWEEP_SECONDS
from thaw.core.spec import FunctionSpec, pack_bundle, parse_spec

SUM_APP = '''
class Sum:
    def __call__(self, request):
        return {"sum": sum(request.json()["numbers"])}
'''
SUM_TOML = '''
name = "soak-sum"
handler = "app:Sum"

[scaling]
min_instances = 1
max_instances = 1
target_concurrency = 16
max_concurrency = 32
scaledown_window = "600s"
'''
# The warm-up: this part of the duration, at least WARMUP_MIN_S, at most half of it
# (the measured part is never shorter than the warm-up).
WARMUP_FRACTION = 0.2
WARMUP_MIN_S = 20.0
WARMUP_MAX_FRACTION = 0.5
# Past its set part, the warm-up goes on by steps of WARMUP_STEP_S while the objects the
# collector tracks in the gateway or an agent grew more than WARMUP_STEADY over the
# last step (a bounded table still filling), within WARMUP_MAX_FRACTION of the duration.
WARMUP_STEP_S = 15.0
WARMUP_STEADY = 0.01
# After each part, the time for the services' kept connections (gateway to node, agent
# to instance) to pass the node client's idle limit and be swept, plus a second.
POOL_DRAIN_S = IDLE_SECONDS + SWEEP_SECONDS + 1.0
# The platform at rest: each valid function back to its min_instances, which it reaches
# within its scaledown_window of its last call; waited for at most that window plus
# REST_MARGIN_S (the scheduler's scale-down pass), polled every REST_POLL_S.
REST_MARGIN_S = 30.0
REST_POLL_S = 1.0
# A function that takes longer to scale down is reported not at rest (`at_rest`).
REST_LONGEST_S = 180.0
# Then the longest wait for the services' descriptor counts to hold still: QUIET_SAMPLES
# samples half a second apart with the same counts.
SETTLE_S = 15.0
QUIET_SAMPLES = 4
SAMPLE_INTERVAL_S = 1.0
# Least time between two deploys of the deployer: an accepted bad bundle builds.
DEPLOY_INTERVAL_S = 1.0
RSS_GROWTH_GOAL = 0.10
HEAP_GROWTH_GOAL = 0.10
# Bad input comes from another loopback address than the valid calls (all of 127/8
# is the loopback interface on Linux), as an attacker's would.
BAD_SOURCE = "127.0.0.2"


class SoakPlatform(Platform, Protocol):
    """A platform whose service processes the soak can watch."""

    function_url: str
    procs: list[tuple[str, subprocess.Popen[bytes]]]


class SoakPlatformFactory(Protocol):
    def __call__(self, home: Path, host_devices: str) -> SoakPlatform: ...


async def _sampling(watch: Watch, stop: asyncio.Event, midpoint: float) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        taken = await asyncio.to_thread(watch.take)
        if not watch.mid and loop.time() >= midpoint:
            watch.mid = taken
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)


class _Quiet:
    """Whether the services' descriptor counts have not changed for QUIET_SAMPLES."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.same = 0

    def __call__(self, now: dict[str, Sample]) -> bool:
        counts = {name: sample.fds for name, sample in now.items()}
        self.same = self.same + 1 if counts == self.last else 0
        self.last = counts
        return self.same >= QUIET_SAMPLES - 1


@dataclass(frozen=True)
class SoakSettings:
    duration: float = 120.0
    concurrency: int = 8
    slow: int = 8
    slow_hold: float = 45.0
    warmup: float | None = None
    """Seconds of warm-up (None: WARMUP_FRACTION of the duration, at least
    WARMUP_MIN_S); never more than WARMUP_MAX_FRACTION of the duration."""
    drain: float = POOL_DRAIN_S
    """Seconds waited after each part before the quiet point is looked for."""

    def warmup_seconds(self) -> float:
        wanted = (max(WARMUP_MIN_S, WARMUP_FRACTION * self.duration)
                  if self.warmup is None else self.warmup)
        return max(0.0, min(wanted, WARMUP_MAX_FRACTION * self.duration))


Listing = dict[str, dict[str, Any]] | None
"""The platform's functions: name -> state and warm instances (None: no answer)."""


@dataclass(frozen=True)
class Rest:
    """The platform at rest: each valid function (name -> min_instances) with no more
    warm instances than its floor. Reached within `longest` seconds of the last call
    (the longest scaledown_window and the scale-down pass); an instance more or less
    holds descriptors of its own (its process's pidfd, connections), so the two quiet
    points are compared at rest."""

    floors: dict[str, int]
    longest: float
    functions: Callable[[], Listing]

    def holds(self, listed: Listing) -> bool:
        return listed is not None and all(
            name in listed and listed[name]["warm_instances"] <= floor
            for name, floor in self.floors.items())


def _rest_within(specs: tuple[FunctionSpec, ...]) -> float:
    """Seconds after the last call by which every function that can scale down has."""
    windows = [spec.scaling.scaledown_window for spec in specs
               if spec.scaling.min_instances < spec.scaling.max_instances]
    return min(REST_LONGEST_S, max(windows, default=0.0) + REST_MARGIN_S)


async def _quiet(watch: Watch, drain: float, rest: Rest) -> tuple[float, bool, Listing]:
    """Wait `drain` seconds and until the platform is at rest (at most `rest.longest`
    from the start), then until the services' descriptor counts hold still (at most
    SETTLE_S more); the seconds waited, whether it was at rest, and its functions."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.sleep(drain)
    listed = await asyncio.to_thread(rest.functions)
    while not rest.holds(listed) and loop.time() - began < rest.longest:
        await asyncio.sleep(REST_POLL_S)
        listed = await asyncio.to_thread(rest.functions)
    await settle(watch, _Quiet(), SETTLE_S)
    return loop.time() - began, rest.holds(listed), listed


async def _phase(target: Target, settings: SoakSettings, seconds: float,
                 tally: Tally, every_kind: bool = True) -> float:
    """The mix for `seconds` (with `every_kind`, longer if need be to try each bad input
    once; without, no slow connection that cannot be held to its end), on connections
    of its own that are closed when it ends; the seconds it ran."""
    loop = asyncio.get_running_loop()
    quick = quick_kinds()
    deploys = {kind: deploy(tarball) for kind, tarball in bundles().items()}
    connector = aiohttp.TCPConnector(limit=settings.concurrency)
    began = loop.time()
    async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=VALID_TIMEOUT_S),
            headers={"Authorization": f"Bearer {target.key}"}) as session:
        valid = Valid(session, f"http://{target.host}:{target.function_port}",
                       target.tenant, target.function)
        deadline = began + seconds
        slow = slow_kinds(settings.slow_hold)
        schedule = itertools.cycle(quick)
        tried, slow_tried, deployed = (set[str](), set[str](), set[str]()) if every_kind else (
            set(quick), set(slow), set(deploys))
        await asyncio.gather(
            *(mixed_lane(valid, quick, target, tally, deadline, schedule, tried)
              for _ in range(settings.concurrency)),
            *(serial_lane(slow, target, tally, deadline, slow_tried,
                           reserve=settings.slow_hold, start=i)
              for i in range(settings.slow)),
            serial_lane(deploys, target, tally, deadline, deployed, gap=DEPLOY_INTERVAL_S))
    return loop.time() - began


async def _soak(target: Target, settings: SoakSettings, watch: Watch, tally: Tally,
                rest: Rest) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    warmup = settings.warmup_seconds()
    watch.ready = await asyncio.to_thread(watch.take, True)
    watch.heap_ready = await asyncio.to_thread(watch.probe)
    warmed = await _phase(target, settings, warmup, tally) if warmup else 0.0
    # Bounded tables fill at the pace of the calls: while the heap still grows, and the
    # cap leaves room, the warm-up goes on a step at a time.
    cap = WARMUP_MAX_FRACTION * settings.duration
    stepping = warmup > 0 and warmup + WARMUP_STEP_S <= cap
    before = await asyncio.to_thread(watch.probe) if stepping else {}
    while before:
        warmed += await _phase(target, settings, WARMUP_STEP_S, tally, every_kind=False)
        warmup += WARMUP_STEP_S
        after = await asyncio.to_thread(watch.probe)
        watch.warmup_growth = heap_steps(before, after, judged(watch.pids))
        if warmup_steady(watch.warmup_growth) or warmup + WARMUP_STEP_S > cap:
            break
        before = after
    quiet, watch.at_rest["start"], watch.functions["start"] = await _quiet(
        watch, settings.drain, rest)
    watch.start = await asyncio.to_thread(watch.take, True)
    watch.heap_start = await asyncio.to_thread(watch.probe)
    measured = settings.duration - warmup
    watch.warmup_used = warmup
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sampling(watch, stop, loop.time() + measured / 2))
    try:
        elapsed = await _phase(target, settings, measured, tally)
    finally:
        stop.set()
        await sampler
    settled, watch.at_rest["end"], watch.functions["end"] = await _quiet(
        watch, settings.drain, rest)
    watch.end = await asyncio.to_thread(watch.take, True)
    watch.heap_end = await asyncio.to_thread(watch.probe)
    return {"warmup_elapsed_s": warmed, "quiet_s": quiet, "elapsed_s": elapsed,
            "settle_s": settled}


def judged(services: Iterable[str]) -> list[str]:
    """The services the goals judge: the gateway and every agent."""
    return [n for n in services if n == "gateway" or n.startswith("agent")]


def heap_steps(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]],
               names: list[str]) -> dict[str, float | None]:
    """Growth of the objects the collector tracks from one probe to the next, per
    service (None: not probed both times)."""
    return {n: growth(before[n]["gc_objects"], after[n]["gc_objects"])
            if n in before and n in after else None for n in names}


def warmup_steady(steps: dict[str, float | None]) -> bool:
    """Whether no judged service's heap grew more than WARMUP_STEADY over a step."""
    return bool(steps) and all(g is not None and g <= WARMUP_STEADY for g in steps.values())


def _is_5xx(status: str) -> bool:
    return len(status) == 3 and status.startswith("5")


def _refused(kind: str, outcomes: Counter[str]) -> bool:
    """A bad input is refused when every attempt was answered 4xx; a slow client may
    instead be answered 408 or closed."""
    ok = {"408", "closed"} if kind.startswith("slow_") else set()
    return all(s in ok or (len(s) == 3 and s.startswith("4")) for s in outcomes)


def _service(sample0: Sample, sample1: Sample, watch: Watch, name: str) -> dict[str, Any]:
    rss0, fds0, rss1, fds1 = sample0.rss, sample0.fds, sample1.rss, sample1.fds
    mid = watch.mid[name].rss if name in watch.mid else None
    ready = watch.ready[name].rss if name in watch.ready else None
    return {"rss_ready_bytes": ready, "rss_start_bytes": rss0, "rss_end_bytes": rss1,
            "rss_peak_bytes": watch.peak_rss[name], "rss_mid_bytes": mid,
            "rss_growth_second_half": growth(mid, rss1) if mid is not None else None,
            "rss_growth_from_ready": growth(ready, rss1) if ready is not None else None,
            "rss_growth": growth(rss0, rss1),
            "fds_start": fds0, "fds_end": fds1, "fds_growth": fds1 - fds0,
            **fds_report(sample0, sample1),
            "heap": heap_report(watch.heap_start.get(name), watch.heap_end.get(name),
                                watch.heap_ready.get(name))}


def _heap_growth(heap: dict[str, Any]) -> float | None:
    """The larger growth of the objects the collector tracks and of malloc's bytes in
    use (the figures a leak of Python objects or of native memory makes grow)."""
    figures = [heap[k]["growth"] for k in ("gc_objects", "malloc_in_use_bytes") if k in heap]
    return max(figures) if heap.get("measured") and figures else None


def report(settings: SoakSettings, times: dict[str, float], tally: Tally, watch: Watch,
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
        services[name] = {"alive": alive.get(name, False), "measured": True,
                          **_service(watch.start[name], watch.end[name], watch, name)}
    judged_names = judged(services)
    valid_5xx = sum(n for s, n in tally.valid.items() if _is_5xx(s))
    valid_dropped = sum(n for s, n in tally.valid.items() if s.startswith("error_"))
    wrong = tally.valid.get("200_wrong_answer", 0)
    rss_growth = {n: services[n].get("rss_growth") for n in judged_names}
    fds_growth = {n: services[n].get("fds_growth") for n in judged_names}
    heap_growth = {n: _heap_growth(services[n].get("heap", {})) for n in judged_names}
    return {
        "duration_s": settings.duration,
        "warmup_seconds": watch.warmup_used,
        "warmup_planned_s": settings.warmup_seconds(),
        "warmup_steady": (warmup_steady(watch.warmup_growth) if watch.warmup_growth
                          else None),
        "warmup_last_step_growth": watch.warmup_growth,
        "warmup_elapsed_s": round(times["warmup_elapsed_s"], 2),
        "quiet_s": round(times["quiet_s"], 2),
        "measured_elapsed_s": round(times["elapsed_s"], 2),
        "elapsed_s": round(round(times["warmup_elapsed_s"], 2)
                           + round(times["elapsed_s"], 2), 2),
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
        "functions_at": {"start": watch.functions.get("start"),
                         "end": watch.functions.get("end")},
        "at_rest": {"start": watch.at_rest.get("start"), "end": watch.at_rest.get("end")},
        "goals": {
            "valid_no_5xx": {"ok": valid_5xx == 0 and valid_dropped == 0 and wrong == 0,
                             "5xx": valid_5xx, "dropped": valid_dropped,
                             "wrong_answer": wrong},
            "rss_growth_under_10pct": {
                "ok": all(g is not None and g < RSS_GROWTH_GOAL for g in rss_growth.values()),
                "growth": rss_growth},
            "no_fd_growth": {"ok": all(g is not None and g <= 0 for g in fds_growth.values()),
                             "growth": fds_growth},
            "heap_growth_under_10pct": {
                "ok": all(g is not None and g < HEAP_GROWTH_GOAL for g in heap_growth.values()),
                "growth": heap_growth},
            "services_alive": {"ok": all(alive.values()), "alive": alive},
        },
    }


def _deploy_valid(http: httpx.Client, folder: Path) -> None:
    resp = http.post("/v1/functions", params={"wait": "true"},
                     content=pack_bundle(str(folder)))
    if resp.status_code != 201 or resp.json().get("state") != "ready":
        raise RuntimeError(f"{folder} did not deploy: {resp.status_code} {resp.text}")


@contextlib.contextmanager
def _probed_services(folder: Path) -> Iterator[Path]:
    """While in it, the services a platform starts load the heap probe (a
    `sitecustomize` on their PYTHONPATH) and answer in the folder yielded."""
    site, answers = folder / "site", folder / "answers"
    site.mkdir(parents=True)
    answers.mkdir()
    (site / "sitecustomize.py").write_text(soak_probe.sitecustomize_source())
    saved = os.environ.get("PYTHONPATH", "")
    added = {soak_probe.PROBE_ENV: str(answers), soak_probe.SAVED_PYTHONPATH_ENV: saved,
             "PYTHONPATH": os.pathsep.join(filter(None, [str(site), saved]))}
    with service_environment(added):
        yield answers


def run_soak_bench(echo: str = "examples/echo", settings: SoakSettings | None = None, *,
                   platform: SoakPlatformFactory, sampler: Sampler = sample_process,
                   probe: bool = sys.platform == "linux") -> dict[str, Any]:
    """The soak against a private platform from `platform`; with `probe`, its
    services answer the heap probe (bench/soak_probe.py)."""
    settings = settings or SoakSettings()
    echo_dir = Path(echo).resolve()
    echo_spec = parse_spec((echo_dir / "thaw.toml").read_text())
    specs = (echo_spec, parse_spec(SUM_TOML))
    echo_name = echo_spec.name
    with tempfile.TemporaryDirectory(prefix="thaw-soak-") as tmp:
        sum_dir = Path(tmp) / "sum"
        sum_dir.mkdir()
        (sum_dir / "app.py").write_text(SUM_APP)
        (sum_dir / "thaw.toml").write_text(SUM_TOML)
        local = platform(Path(tmp) / "home", "2x8GiB")
        answers = None
        if probe:
            with _probed_services(Path(tmp) / "probe") as answers:
                local.start()
        else:
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
            watch = Watch(sampler, {name: proc.pid for name, proc in local.procs}, answers)
            tally = Tally()
            rest = Rest({spec.name: spec.scaling.min_instances for spec in specs},
                        _rest_within(specs), lambda: _functions(local))
            times = asyncio.run(_soak(target, settings, watch, tally, rest))
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
