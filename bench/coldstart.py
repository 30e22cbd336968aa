"""`thaw bench coldstart`: request-to-response latency through the gateway with no
warm instance, snapshot restore vs fresh start, plus a warm call, in one run.

It starts a private local platform (its own THAW_HOME, port 0), deploys the bundle
under different names: snapshots on with scaledown_window = 0s (every call after the
instance is reaped is a restore), snapshots off with scaledown_window = 0s (every such
call is a fresh start: imports + setup()), and, once those two are deleted (so that at
most one copy of a large model is warm at a time), snapshots on with a long window (warm
calls). Each kind's `Server-Timing` stages are reported beside its total, with what the
stages leave unaccounted.
"""

from __future__ import annotations

import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from thaw.bench.platform import PlatformFactory
from thaw.core.errors import InvalidArgument
from thaw.core.spec import pack_bundle
from thaw.gateway.timing import PATH_STAGES

# Cold calls must find no instance: wait for scale-to-zero (reconcile runs every 1 s).
SCALE_TO_ZERO_WAIT = 120.0
# Then a pause, so that a stopped instance's process has ended (a fresh one that loaded a
# model frees it as it exits): a cold call is measured on an otherwise idle node.
SETTLE_SECONDS = 2.0


def _variant(src: Path, dest: Path, name: str, snapshot: bool, window: str) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    text = (dest / "thaw.toml").read_text()
    text = re.sub(r'(?m)^name\s*=.*$', f'name = "{name}"', text, count=1)
    text = re.sub(r'(?m)^scaledown_window\s*=.*$\n?', "", text)
    text = re.sub(r'(?m)^min_instances\s*=.*$\n?', "", text)
    if "[scaling]" in text:
        text = text.replace("[scaling]", f'[scaling]\nscaledown_window = "{window}"', 1)
    else:
        text += f'\n[scaling]\nscaledown_window = "{window}"\n'
    if not snapshot:
        text += "\n[snapshot]\nenabled = false\n"
    (dest / "thaw.toml").write_text(text)
    return dest


def _stages(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = round(float(dur) / 1000, 4)
    return out


def _wait_cold(http: httpx.Client, name: str) -> None:
    deadline = time.monotonic() + SCALE_TO_ZERO_WAIT
    while http.get(f"/v1/functions/{name}").json()["warm_instances"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not scale to zero")
        time.sleep(0.2)


def _call(http: httpx.Client, name: str, payload: Any) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    resp = http.post(f"/fn/dev/{name}", json=payload)
    elapsed = time.perf_counter() - started
    resp.raise_for_status()
    return elapsed, resp


# What is not the instance's start in a call's Server-Timing: the way through gateway
# and node, and the handler's run.
NOT_START = PATH_STAGES | {"run", "total"}


def _timed(elapsed: float, resp: httpx.Response) -> dict[str, Any]:
    """One call's total beside its Server-Timing stages, what they leave out, and its
    start: the stages before the handler ran (queue, then launch, import and setup for
    a fresh start; fetch, template, restore, fork and prefault for a restore)."""
    stages = _stages(resp.headers.get("Server-Timing", ""))
    staged = sum(v for k, v in stages.items() if k != "total")
    start = sum(v for k, v in stages.items() if k not in NOT_START)
    return {"total_s": round(elapsed, 4), "stages_s": stages,
            "stages_sum_s": round(staged, 4), "unaccounted_s": round(elapsed - staged, 4),
            "start_s": round(start, 4)}


def run_coldstart_bench(function: str, rounds: int = 3,
                        payload: Any = None, *,
                        platform: PlatformFactory, warm_calls: int = 10,
                        goal: float | None = None) -> dict[str, Any]:
    """Fresh vs restore vs warm first-call latency of the bundle at `function`; returns
    the JSON object of `thaw bench coldstart` (medians over `rounds` cold starts of each
    kind and `warm_calls` warm calls)."""
    if rounds < 1:
        raise InvalidArgument(f"rounds must be >= 1, got {rounds!r}", field="rounds")
    if warm_calls < 1:
        raise InvalidArgument(f"warm_calls must be >= 1, got {warm_calls!r}",
                              field="warm_calls")
    payload = payload if payload is not None else {"text": "hello world"}
    src = Path(function).resolve()
    with tempfile.TemporaryDirectory(prefix="thaw-bench-") as tmp:
        home = Path(tmp) / "home"
        base = re.search(r'(?m)^name\s*=\s*"([^"]+)"', (src / "thaw.toml").read_text())
        stem = (base.group(1) if base else "fn")[:40]
        names = {"restore": f"{stem}-bench-restore", "fresh": f"{stem}-bench-fresh",
                 "warm": f"{stem}-bench-warm"}
        bundles = {
            "restore": _variant(src, Path(tmp) / "r", names["restore"], True, "0s"),
            "fresh": _variant(src, Path(tmp) / "f", names["fresh"], False, "0s"),
            "warm": _variant(src, Path(tmp) / "w", names["warm"], True, "600s"),
        }
        local = platform(home, "2x8GiB")
        local.start()
        try:
            http = httpx.Client(base_url=local.url, timeout=900,
                                headers={"Authorization": f"Bearer {local.key}"})
            for kind in ("restore", "fresh"):
                _deploy(http, kind, bundles[kind])
            samples: dict[str, list[float]] = {"restore": [], "fresh": [], "warm": []}
            calls: dict[str, list[dict[str, Any]]] = {"restore": [], "fresh": [], "warm": []}
            for _ in range(rounds):
                for kind in ("restore", "fresh"):
                    # Both at zero and settled: a call never shares the node with the
                    # other variant's instance while that one is still being stopped.
                    for other in ("restore", "fresh"):
                        _wait_cold(http, names[other])
                    time.sleep(SETTLE_SECONDS)
                    elapsed, resp = _call(http, names[kind], payload)
                    if resp.headers.get("X-Thaw-Start") != kind:
                        raise RuntimeError(f"expected a {kind} start, got "
                                           f"{resp.headers.get('X-Thaw-Start')}")
                    samples[kind].append(elapsed)
                    calls[kind].append(_timed(elapsed, resp))
            for kind in ("restore", "fresh"):
                http.delete(f"/v1/functions/{names[kind]}").raise_for_status()
            _deploy(http, "warm", bundles["warm"])
            _call(http, names["warm"], payload)  # first call starts it
            for _ in range(warm_calls):
                elapsed, resp = _call(http, names["warm"], payload)
                if resp.headers.get("X-Thaw-Start") != "warm":
                    raise RuntimeError("expected a warm call")
                samples["warm"].append(elapsed)
                calls["warm"].append(_timed(elapsed, resp))
            http.close()
        finally:
            local.stop()
    # The ratios are of the figures as printed, so a reader recomputes them exactly.
    fresh_s = round(statistics.median(samples["fresh"]), 4)
    restore_s = round(statistics.median(samples["restore"]), 4)
    warm_s = round(statistics.median(samples["warm"]), 4)
    speedup = round(fresh_s / restore_s, 1)
    fresh_start_s = round(statistics.median(c["start_s"] for c in calls["fresh"]), 4)
    restore_start_s = round(statistics.median(c["start_s"] for c in calls["restore"]), 4)
    start_speedup = round(fresh_start_s / max(restore_start_s, 1e-4), 1)
    report: dict[str, Any] = {
        "function": str(function),
        "rounds": rounds,
        "fresh_s": round(fresh_s, 4),
        "restore_s": round(restore_s, 4),
        "warm_s": round(warm_s, 4),
        "speedup": speedup,
        "restore_over_warm_s": round(restore_s - warm_s, 4),
        "fresh_start_s": fresh_start_s,
        "restore_start_s": restore_start_s,
        "start_speedup": start_speedup,
        "fresh_samples_s": [round(x, 4) for x in samples["fresh"]],
        "restore_samples_s": [round(x, 4) for x in samples["restore"]],
        "warm_samples_s": [round(x, 4) for x in samples["warm"]],
        "last_server_timing_s": {kind: kind_calls[-1]["stages_s"]
                                 for kind, kind_calls in calls.items()},
        "calls": calls,
    }
    if goal is not None:
        # The goal is on the start (fresh start / restore start); `speedup` is of whole
        # first calls, the handler's run included in both.
        report["speedup_goal"] = goal
        report["goal_met"] = start_speedup >= goal
    return report


def _deploy(http: httpx.Client, kind: str, folder: Path) -> None:
    resp = http.post("/v1/functions", params={"wait": "true"},
                     content=pack_bundle(str(folder)))
    resp.raise_for_status()
    if resp.json()["state"] != "ready":
        raise RuntimeError(f"{kind} variant did not deploy: {resp.json()}")
