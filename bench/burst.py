"""`thaw bench burst`: many concurrent first calls to a function at zero instances.

It starts a private local platform, deploys a copy of the bundle with the given
max_instances / max_concurrency, waits until the function has no instance, then sends
`calls` requests at once (one connection each) and measures each call's latency. The
restores (and any fresh starts) the burst caused are counted from the scheduler's
event log (`instance_started` events of the function, GET /v1/events), not guessed
from responses. The reference is the same number of concurrent calls sent again
right after, to the now warm instances, in the same run.

One gateway bounds connections per client address (max_connections_per_address) and
requests queued per function (queue_high_water): for the burst, the bench raises both
on its own platform, through the THAW_* environment its services start with, so that
what is measured is the burst, not the shedding of a single client's excess (which
docs/limits.md describes).
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from thaw.bench.coldstart import _wait_cold
from thaw.bench.platform import PlatformFactory, service_environment
from thaw.core.spec import pack_bundle

CALL_TIMEOUT = 600.0


def burst_settings(calls: int) -> dict[str, str]:
    """The gateway settings a burst of `calls` concurrent calls from one address needs
    (each a connection, each queued for the cold function)."""
    return {"THAW_MAX_CONNECTIONS_PER_ADDRESS": str(calls + 64),
            "THAW_QUEUE_HIGH_WATER": str(calls + 64),
            "THAW_QUEUE_LOW_WATER": str(max(1, (calls + 64) // 2))}


def burst_bundle(src: Path, dest: Path, name: str, max_instances: int,
                 max_concurrency: int) -> Path:
    """A copy of the bundle `src` named `name` with these scaling limits (the other
    [scaling] keys kept, min_instances dropped: the burst starts from zero)."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    text = (dest / "thaw.toml").read_text()
    text = re.sub(r'(?m)^name\s*=.*$', f'name = "{name}"', text, count=1)
    text = re.sub(r'(?m)^(min_instances|max_instances|max_concurrency)\s*=.*$\n?', "",
                  text)
    limits = f"max_instances = {max_instances}\nmax_concurrency = {max_concurrency}\n"
    if "[scaling]" in text:
        text = text.replace("[scaling]\n", "[scaling]\n" + limits, 1)
    else:
        text += "\n[scaling]\n" + limits
    (dest / "thaw.toml").write_text(text)
    return dest


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _burst(url: str, key: str, name: str, calls: int, payload: dict[str, Any]
                 ) -> tuple[list[float], Counter[int], Counter[str]]:
    """`calls` concurrent calls (all sent before any is answered): latencies of the
    answered ones, statuses (0: no answer), and X-Thaw-Start of the 200s."""
    limits = httpx.Limits(max_connections=calls, max_keepalive_connections=calls)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=CALL_TIMEOUT,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        gate = asyncio.Event()

        async def one() -> tuple[float, int, str]:
            await gate.wait()
            began = time.perf_counter()
            try:
                resp = await client.post(f"/fn/dev/{name}", json=payload)
            except httpx.HTTPError:
                return time.perf_counter() - began, 0, ""
            return (time.perf_counter() - began, resp.status_code,
                    resp.headers.get("X-Thaw-Start", ""))

        tasks = [asyncio.ensure_future(one()) for _ in range(calls)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*tasks)
    latencies = [t for t, status, _ in results if status == 200]
    return (latencies, Counter(status for _, status, _ in results),
            Counter(start for _, status, start in results if status == 200))


def _starts_since(http: httpx.Client, name: str, after: int) -> Counter[str]:
    """instance_started events of dev/`name` after event `after`, by start kind."""
    kinds: Counter[str] = Counter()
    while True:
        reply = http.get("/v1/events", params={"after": after, "limit": 10_000,
                                               "kind": "instance_started"})
        reply.raise_for_status()
        events = reply.json()["events"]
        for e in events:
            if e["function"] == f"dev/{name}":
                kinds[e["attrs"].get("start", "")] += 1
        if not events:
            return kinds
        after = events[-1]["seq"]


def _figures(latencies: list[float], statuses: Counter[int]) -> dict[str, Any]:
    return {"answered_200": statuses.get(200, 0),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "p50_s": round(_percentile(latencies, 0.5), 4) if latencies else None,
            "p99_s": round(_percentile(latencies, 0.99), 4) if latencies else None,
            "max_s": round(max(latencies), 4) if latencies else None}


def run_burst_bench(function: str = "examples/echo", calls: int = 1000,
                    max_instances: int = 4, max_concurrency: int = 16,
                    payload: dict[str, Any] | None = None, *,
                    platform: PlatformFactory) -> dict[str, Any]:
    """`calls` concurrent first calls to a copy of `function` at zero instances, then
    the same calls warm; restores counted from the scheduler's events."""
    if calls < 1 or max_instances < 1 or max_concurrency < 1:
        raise ValueError("calls, max_instances and max_concurrency must be at least 1")
    payload = payload if payload is not None else {"burst": True}
    src = Path(function).resolve()
    name = "burst"
    with tempfile.TemporaryDirectory(prefix="thaw-bench-burst-") as tmp:
        folder = burst_bundle(src, Path(tmp) / "bundle", name, max_instances,
                              max_concurrency)
        local = platform(Path(tmp) / "home", "2x8GiB")
        with service_environment(burst_settings(calls)):
            local.start()
        try:
            http = httpx.Client(base_url=local.url, timeout=900,
                                headers={"Authorization": f"Bearer {local.key}"})
            resp = http.post("/v1/functions", params={"wait": "true"},
                             content=pack_bundle(str(folder)))
            resp.raise_for_status()
            if resp.json()["state"] != "ready":
                raise RuntimeError(f"{function} did not deploy: {resp.json()}")
            _wait_cold(http, name)
            seq = http.get("/v1/events", params={"limit": 1}).json()["last_seq"]
            cold, cold_status, cold_starts = asyncio.run(
                _burst(local.url, local.key, name, calls, payload))
            started = _starts_since(http, name, seq)
            seq = http.get("/v1/events", params={"limit": 1}).json()["last_seq"]
            warm, warm_status, _ = asyncio.run(
                _burst(local.url, local.key, name, calls, payload))
            started_warm = _starts_since(http, name, seq)
            http.close()
        finally:
            local.stop()
    burst, reference = _figures(cold, cold_status), _figures(warm, warm_status)
    restores = started.get("restore", 0)
    return {
        "function": str(function), "calls": calls, "max_instances": max_instances,
        "max_concurrency": max_concurrency, **burst,
        "restores_started": restores,
        "starts_started": sum(started.values()),
        "start_kinds": dict(started),
        "responses_by_start": dict(cold_starts),
        "restores_within_limit": sum(started.values()) <= max_instances,
        "reference_warm": {**reference, "starts_started": sum(started_warm.values())},
        "ratio_p99": (round(burst["p99_s"] / reference["p99_s"], 2)
                      if burst["p99_s"] and reference["p99_s"] else None),
        "gateway_settings": burst_settings(calls),
    }
