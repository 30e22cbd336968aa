"""`thaw bench coldstart`: request-to-response latency through the gateway with no
warm instance, snapshot restore vs fresh start, plus a warm call, in one run.

It starts a private local platform (its own THAW_HOME, port 0), deploys the bundle
three times under different names: snapshots on with scaledown_window = 0s (every call
after the instance is reaped is a restore), snapshots off with scaledown_window = 0s
(every such call is a fresh start: imports + setup()), and snapshots on with a long
window (warm calls).
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
from thaw.core.spec import pack_bundle

# Cold calls must find no instance: wait for scale-to-zero (reconcile runs every 1 s).
SCALE_TO_ZERO_WAIT = 30.0


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


def _call(http: httpx.Client, name: str, payload: dict[str, Any]) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    resp = http.post(f"/fn/dev/{name}", json=payload)
    elapsed = time.perf_counter() - started
    resp.raise_for_status()
    return elapsed, resp


def run_coldstart_bench(function: str, rounds: int = 3,
                        payload: dict[str, Any] | None = None, *,
                        platform: PlatformFactory) -> dict[str, Any]:
    payload = payload if payload is not None else {"texts": ["hello world"]}
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
            for kind, folder in bundles.items():
                resp = http.post("/v1/functions", params={"wait": "true"},
                                 content=pack_bundle(str(folder)))
                resp.raise_for_status()
                if resp.json()["state"] != "ready":
                    raise RuntimeError(f"{kind} variant did not deploy: {resp.json()}")
            samples: dict[str, list[float]] = {"restore": [], "fresh": [], "warm": []}
            breakdown: dict[str, dict[str, float]] = {}
            for _ in range(rounds):
                for kind in ("restore", "fresh"):
                    _wait_cold(http, names[kind])
                    elapsed, resp = _call(http, names[kind], payload)
                    if resp.headers.get("X-Thaw-Start") != kind:
                        raise RuntimeError(f"expected a {kind} start, got "
                                           f"{resp.headers.get('X-Thaw-Start')}")
                    samples[kind].append(elapsed)
                    breakdown[kind] = _stages(resp.headers.get("Server-Timing", ""))
            _call(http, names["warm"], payload)  # first call starts it
            for _ in range(max(rounds, 10)):
                elapsed, resp = _call(http, names["warm"], payload)
                if resp.headers.get("X-Thaw-Start") != "warm":
                    raise RuntimeError("expected a warm call")
                samples["warm"].append(elapsed)
            http.close()
        finally:
            local.stop()
    fresh_s = statistics.median(samples["fresh"])
    restore_s = statistics.median(samples["restore"])
    return {
        "function": str(function),
        "rounds": rounds,
        "fresh_s": round(fresh_s, 4),
        "restore_s": round(restore_s, 4),
        "warm_s": round(statistics.median(samples["warm"]), 4),
        "speedup": round(fresh_s / restore_s, 1),
        "fresh_samples_s": [round(x, 4) for x in samples["fresh"]],
        "restore_samples_s": [round(x, 4) for x in samples["restore"]],
        "last_server_timing_s": breakdown,
    }
