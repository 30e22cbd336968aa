"""What an idle deployed function costs a node: memory added per function deployed
with no instance running (its template, and whatever else the node keeps for it).

Deploys `functions` functions on a fresh local platform twice over: first copies of one
bundle (same code: they share one template), then bundles of distinct code in the same
Python environment (each differs by one generated constant, so each has its own code
digest and template). Memory is the sum of PSS over the platform's processes (every
descendant of this process: services, agent, templates, zygotes), plus the node's shared
memory (/proc/meminfo Shmem: memfds and tmpfs, where snapshots live), each measured
before and after; the difference divided by the functions deployed is the cost of one.
PSS splits a page shared by k processes into k parts, so pages a template shares
copy-on-write with its zygote count once over the node.

With `compare`, the same measurement runs again with zygotes off (THAW_ZYGOTES=off: each
template imports everything itself) as the same-run reference.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import tomllib

from thaw.bench.density import _copy
from thaw.bench.platform import PlatformFactory
from thaw.core.spec import pack_bundle

MiB = 1024 * 1024
# Templates start in the background after a deploy answers; wait this long for the
# platform's memory to stop growing before a reading.
SETTLE_TIMEOUT_SECONDS = 120.0
SETTLE_POLL_SECONDS = 2.0
# A reading counts as settled when it moved less than this since the previous one, for
# SETTLE_READINGS readings in a row (a template still importing, a build's memory still
# being returned, grow or shrink a reading by more).
SETTLE_TOLERANCE_BYTES = 4 * MiB
SETTLE_READINGS = 3
ZYGOTES_ENV = "THAW_ZYGOTES"


def platform_memory_bytes() -> int:
    """Sum of PSS over this process's descendants, plus the node's Shmem."""
    return platform_pss_bytes() + _shmem_bytes()


def platform_pss_bytes() -> int:
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += int(child.memory_full_info().pss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


def _shmem_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


def settled_memory() -> tuple[int, int]:
    """(PSS sum, Shmem) once SETTLE_READINGS readings in a row agree."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    previous = (platform_pss_bytes(), _shmem_bytes())
    steady = 0
    while True:
        time.sleep(SETTLE_POLL_SECONDS)
        now = (platform_pss_bytes(), _shmem_bytes())
        steady = steady + 1 if abs(sum(now) - sum(previous)) < SETTLE_TOLERANCE_BYTES else 0
        if steady >= SETTLE_READINGS - 1 or time.monotonic() > deadline:
            return now
        previous = now


def _distinct(src: Path, dest: Path, name: str, variant: int) -> Path:
    """A copy of `src` whose handler module carries one more constant: other code, the
    same imports and environment."""
    bundle: Path = _copy(src, dest, name)
    handler = tomllib.loads((bundle / "thaw.toml").read_text())["handler"]
    module = handler.split(":", 1)[0].replace(".", "/")
    path = bundle / f"{module}.py"
    if not path.is_file():
        path = bundle / module / "__init__.py"
    path.write_text(path.read_text() + f"\nTHAW_BENCH_VARIANT = {variant}\n")
    return bundle


@contextmanager
def _zygotes(setting: str) -> Iterator[None]:
    """The agent the platform starts reads THAW_ZYGOTES from its environment."""
    before = os.environ.get(ZYGOTES_ENV)
    os.environ[ZYGOTES_ENV] = setting
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ZYGOTES_ENV, None)
        else:
            os.environ[ZYGOTES_ENV] = before


def _deploy(http: httpx.Client, bundle: Path) -> None:
    resp = http.post("/v1/functions", params={"wait": "true"}, content=pack_bundle(str(bundle)))
    resp.raise_for_status()
    if resp.json()["state"] != "ready":
        raise RuntimeError(f"{bundle.name} did not deploy: {resp.json()}")


def measure_idle(function: str, functions: int, *, platform: PlatformFactory,
                 zygotes: str = "on") -> dict[str, float]:
    """MB added per idle copy and per idle distinct function, on one fresh platform."""
    src = Path(function).resolve()
    with tempfile.TemporaryDirectory(prefix="thaw-idle-") as tmp, _zygotes(zygotes):
        local = platform(Path(tmp) / "home", "1x64GiB")
        local.start()
        try:
            http = httpx.Client(base_url=local.url, timeout=900,
                                headers={"Authorization": f"Bearer {local.key}"})
            # One function first, so the node's one-time costs (its first environment,
            # its zygote, the template the copies share) are not counted as any
            # function's.
            _deploy(http, _copy(src, Path(tmp) / "first", "idle-first"))
            base = settled_memory()
            for i in range(functions):
                _deploy(http, _copy(src, Path(tmp) / f"copy-{i}", f"idle-copy-{i}"))
            copies = settled_memory()
            for i in range(functions):
                _deploy(http, _distinct(src, Path(tmp) / f"distinct-{i}",
                                        f"idle-distinct-{i}", i))
            distinct = settled_memory()
            http.close()
        finally:
            local.stop()
            shutil.rmtree(Path(tmp) / "home", ignore_errors=True)

    def per_function(after: tuple[int, int], before: tuple[int, int], part: int | None = None
                     ) -> float:
        parts = (0, 1) if part is None else (part,)
        return round(sum(after[i] - before[i] for i in parts) / functions / MiB, 1)

    # Shmem is the node's: other work on the machine moves it too, so it is also
    # reported apart from the platform's own PSS.
    return {"idle_mb_per_copy": per_function(copies, base),
            "idle_mb_per_function": per_function(distinct, copies),
            "idle_pss_mb_per_copy": per_function(copies, base, 0),
            "idle_pss_mb_per_function": per_function(distinct, copies, 0),
            "idle_shmem_mb_per_function": per_function(distinct, copies, 1)}


def run_idle_density_bench(function: str, functions: int = 6, *,
                           platform: PlatformFactory, compare: bool = True
                           ) -> dict[str, Any]:
    """`idle_mb_per_function` (distinct code, the honest case), `idle_mb_per_copy`
    (copies of one bundle) with zygotes on; with `compare`, the same with zygotes off
    and the ratio of the two per-function figures."""
    if functions < 1:
        raise ValueError("need at least one function")
    result: dict[str, Any] = {
        "function": str(function), "functions": functions,
        "idle_measure": "(delta sum of PSS over the platform's processes + delta Shmem) "
                        "/ functions deployed, no instance running",
        **measure_idle(function, functions, platform=platform, zygotes="on")}
    if compare:
        off = measure_idle(function, functions, platform=platform, zygotes="off")
        result["idle_mb_per_function_zygotes_off"] = off["idle_mb_per_function"]
        result["idle_mb_per_copy_zygotes_off"] = off["idle_mb_per_copy"]
        result["idle_pss_mb_per_function_zygotes_off"] = off["idle_pss_mb_per_function"]
        if result["idle_mb_per_function"] > 0:
            result["idle_zygote_saving_ratio"] = round(
                off["idle_mb_per_function"] / result["idle_mb_per_function"], 1)
    return result


__all__ = ["measure_idle", "platform_memory_bytes", "run_idle_density_bench"]
