"""`thaw bench overhead`: what the platform adds to a warm call (DESIGN.md §10).

One run, side by side: a private local platform (its own THAW_HOME, port 0) serves a
null function (`__call__` returns b""); the same warm instance is called
(a) directly over its unix socket, as the node agent calls it, and
(b) through gateway -> node agent -> instance, as a client calls it.

- Latency (`direct_p50_ms`, `platform_p50_ms`, `added_*`): one client, calls one after
  the other, in alternating rounds of direct and platform calls so both see the same
  machine; `added_p50_ms` is the difference of the medians, `added_p99_ms` of the 99th
  percentiles. `agent_p50_ms` is the same call sent straight to the node agent's data
  plane (no gateway): it splits the added time between the two hops. Unloaded on
  purpose: with many clients on a two-core machine latency is queueing (clients /
  throughput), not what the platform adds to a call.
- Throughput (`rps`): `concurrency` clients (64 by default) calling through the
  platform for `duration` seconds; `loaded` gives its latencies and the direct path's
  under the same load for comparison.

The client runs in this process, on the same cores as the services; so do the
direct calls, so both sides pay the same client cost.
"""

from __future__ import annotations

import asyncio
import ssl
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

from thaw.bench.platform import PlatformFactory
from thaw.core.httptls import local_client_context
from thaw.core.spec import pack_bundle

NULL_FUNCTION = '''
class Null:
    def __call__(self, request):
        return b""
'''
# One instance that takes every client at once: the scheduler never queues, so the
# figures are the path's, not placement's.
NULL_TOML = '''
name = "null"
handler = "app:Null"

[scaling]
max_instances = 1
target_concurrency = 256
max_concurrency = 256
scaledown_window = "600s"
'''
# Calls per alternating round of the latency measurement; rounds alternate until
# `requests` calls of each kind are done.
ROUND_CALLS = 200
# Calls before any timing (connections, the kept lease, caches).
WARMUP_CALLS = 300


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _locate(http: httpx.Client, instance_id: str,
            tls: ssl.SSLContext | None) -> tuple[str, str]:
    """(the unix socket the instance serves on, its URL on the node's data plane)."""
    nodes = http.get("/v1/nodes").json()["nodes"]
    for node in nodes:
        listed = httpx.get(f"{node['data_url']}/v1/instances", timeout=10,
                           verify=tls or True).json()
        for inst in listed["instances"]:
            if inst["id"] == instance_id:
                for conn in psutil.Process(inst["pid"]).net_connections(kind="unix"):
                    if conn.laddr and str(conn.laddr).endswith(".sock"):
                        return (str(conn.laddr),
                                f"{node['data_url']}/v1/instances/{instance_id}/invoke")
    raise RuntimeError(f"no unix socket found for instance {instance_id}")


async def _timed(call: Callable[[], Awaitable[None]], n: int, out: list[float]) -> None:
    for _ in range(n):
        started = time.perf_counter()
        await call()
        out.append((time.perf_counter() - started) * 1000.0)


async def _load(call: Callable[[], Awaitable[None]], clients: int,
                seconds: float) -> tuple[float, list[float]]:
    """`clients` loops calling for `seconds`; returns (calls per second, latencies)."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client() -> int:
        done = 0
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000.0)
            done += 1
        return done

    started = time.perf_counter()
    counts = await asyncio.gather(*(client() for _ in range(clients)))
    return sum(counts) / (time.perf_counter() - started), latencies


async def _measure(url: str, key: str, socket_path: str, agent_url: str, requests: int,
                   concurrency: int, duration: float,
                   tls: ssl.SSLContext | None = None) -> dict[str, Any]:
    direct_session = aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=socket_path, limit=0))
    platform_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        headers={"Authorization": f"Bearer {key}"})
    # The data plane serves only the gateway's certificate (mutual TLS): the direct
    # calls to the agent present it, as the gateway does.
    agent_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=tls or True))

    async def direct() -> None:
        async with direct_session.post("http://instance/invoke", data=b"") as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"direct call answered {resp.status}")

    async def via_agent() -> None:
        async with agent_session.post(agent_url, data=b"") as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"agent call answered {resp.status}")

    async def through_platform() -> None:
        async with platform_session.post(f"{url}/fn/dev/null", data=b"") as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"platform call answered {resp.status}: "
                                   f"{(await resp.read())[:200]!r}")

    try:
        await _timed(direct, WARMUP_CALLS, [])
        await _timed(through_platform, WARMUP_CALLS, [])
        await _timed(via_agent, WARMUP_CALLS, [])
        direct_ms: list[float] = []
        agent_ms: list[float] = []
        platform_ms: list[float] = []
        while len(direct_ms) < requests:
            n = min(ROUND_CALLS, requests - len(direct_ms))
            await _timed(direct, n, direct_ms)
            await _timed(via_agent, n, agent_ms)
            await _timed(through_platform, n, platform_ms)
        direct_rps, direct_loaded = await _load(direct, concurrency, duration)
        rps, platform_loaded = await _load(through_platform, concurrency, duration)
    finally:
        await direct_session.close()
        await platform_session.close()
        await agent_session.close()

    direct_p50, platform_p50 = statistics.median(direct_ms), statistics.median(platform_ms)
    direct_p99, platform_p99 = _percentile(direct_ms, 0.99), _percentile(platform_ms, 0.99)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "direct_p50_ms": round(direct_p50, 3),
        "direct_p99_ms": round(direct_p99, 3),
        "agent_p50_ms": round(statistics.median(agent_ms), 3),
        "platform_p50_ms": round(platform_p50, 3),
        "platform_p99_ms": round(platform_p99, 3),
        "added_p50_ms": round(platform_p50 - direct_p50, 3),
        "added_p99_ms": round(platform_p99 - direct_p99, 3),
        "rps": round(rps, 1),
        "loaded": {
            "seconds": duration,
            "direct_rps": round(direct_rps, 1),
            "direct_p50_ms": round(statistics.median(direct_loaded), 3),
            "direct_p99_ms": round(_percentile(direct_loaded, 0.99), 3),
            "platform_p50_ms": round(statistics.median(platform_loaded), 3),
            "platform_p99_ms": round(_percentile(platform_loaded, 0.99), 3),
        },
    }


def run_overhead_bench(requests: int = 5000, concurrency: int = 64,
                       duration: float = 10.0, *,
                       platform: PlatformFactory) -> dict[str, Any]:
    """Start a private platform from `platform`, measure, stop it; one JSON-able dict."""
    with tempfile.TemporaryDirectory(prefix="thaw-bench-") as tmp:
        folder = Path(tmp) / "null"
        folder.mkdir()
        (folder / "app.py").write_text(NULL_FUNCTION)
        (folder / "thaw.toml").write_text(NULL_TOML)
        local = platform(Path(tmp) / "home", "1x1GiB")
        local.start()
        try:
            with httpx.Client(base_url=local.url, timeout=300,
                              headers={"Authorization": f"Bearer {local.key}"}) as http:
                deployed = http.post("/v1/functions", params={"wait": "true"},
                                     content=pack_bundle(str(folder)))
                deployed.raise_for_status()
                first = http.post("/fn/dev/null", content=b"")
                first.raise_for_status()
                tls = local_client_context(Path(tmp) / "home")
                socket_path, agent_url = _locate(http, first.headers["X-Thaw-Instance"], tls)
                result = asyncio.run(_measure(local.url, local.key, socket_path, agent_url,
                                              requests, concurrency, duration, tls))
                metrics = http.get("/metrics").text
        finally:
            local.stop()
    result["lease_reuses"] = _counter(metrics, "thaw_lease_reuses_total")
    return result


def _counter(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
