"""`thaw bench density`: how many warm copies of a model one node holds.

Deploys `functions` copies of a bundle under different names on one node (host
device), keeps `warm` of them warm, and reports the memory each warm instance adds
(USS: pages only it holds — copies share weights through the blobstore's
content-addressed arenas and imports through one template, copy-on-write) and the
time to bring one more from zero (a restore, through the gateway).
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
from thaw.core.httptls import local_client_context
from thaw.core.spec import pack_bundle

MiB = 1024 * 1024
# Telemetry is sampled on scrape; give a fresh instance's pages a moment to settle.
SETTLE_SECONDS = 1.0


def _copy(src: Path, dest: Path, name: str) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    text = (dest / "thaw.toml").read_text()
    text = re.sub(r'(?m)^name\s*=.*$', f'name = "{name}"', text, count=1)
    text = re.sub(r'(?m)^scaledown_window\s*=.*$\n?', "", text)
    text = text.replace("[scaling]", '[scaling]\nscaledown_window = "3600s"', 1) \
        if "[scaling]" in text else text + '\n[scaling]\nscaledown_window = "3600s"\n'
    (dest / "thaw.toml").write_text(text)
    return dest


def _instance_memory(node_url: str, home: Path) -> dict[str, tuple[float, float]]:
    """instance id -> (USS bytes, RSS bytes) from the agent's telemetry (its data
    plane serves the gateway's certificate only: presented from `home`'s PKI)."""
    tls = local_client_context(home)
    text = httpx.get(f"{node_url}/metrics", timeout=60, verify=tls or True).text
    uss: dict[str, float] = {}
    rss: dict[str, float] = {}
    for line in text.splitlines():
        for prefix, into in (("thaw_instance_unique_bytes", uss),
                             ("thaw_instance_rss_bytes", rss)):
            if line.startswith(prefix + "{"):
                instance = re.search(r'instance="([^"]+)"', line)
                if instance:
                    into[instance.group(1)] = float(line.rsplit(" ", 1)[1])
    return {i: (uss[i], rss.get(i, 0.0)) for i in uss}


def run_density_bench(function: str, functions: int = 50, warm: int = 20,
                      payload: dict[str, Any] | None = None, *,
                      platform: PlatformFactory) -> dict[str, Any]:
    if not 0 < warm < functions:
        raise ValueError("need 0 < warm < functions (one copy is brought up from zero)")
    payload = payload if payload is not None else {"texts": ["hello world"]}
    src = Path(function).resolve()
    with tempfile.TemporaryDirectory(prefix="thaw-density-") as tmp:
        local = platform(Path(tmp) / "home", "1x256GiB")
        local.start()
        try:
            http = httpx.Client(base_url=local.url, timeout=900,
                                headers={"Authorization": f"Bearer {local.key}"})
            names = [f"copy-{i:03d}" for i in range(functions)]
            deploy_started = time.perf_counter()
            for name in names:
                bundle = pack_bundle(str(_copy(src, Path(tmp) / name, name)))
                resp = http.post("/v1/functions", params={"wait": "true"}, content=bundle)
                resp.raise_for_status()
                if resp.json()["state"] != "ready":
                    raise RuntimeError(f"{name} did not deploy: {resp.json()}")
            deploy_s = time.perf_counter() - deploy_started
            instances = []
            for name in names[:warm]:
                resp = http.post(f"/fn/dev/{name}", json=payload)
                resp.raise_for_status()
                instances.append(resp.headers["X-Thaw-Instance"])
            started = time.perf_counter()
            resp = http.post(f"/fn/dev/{names[warm]}", json=payload)
            scale_from_zero_s = time.perf_counter() - started
            resp.raise_for_status()
            start_kind = resp.headers.get("X-Thaw-Start")
            time.sleep(SETTLE_SECONDS)
            node = http.get("/v1/nodes").json()["nodes"][0]
            memory = _instance_memory(node["data_url"], Path(tmp) / "home")
            uss = [memory[i][0] for i in instances if i in memory]
            rss = [memory[i][1] for i in instances if i in memory]
            http.close()
        finally:
            local.stop()
    return {
        "function": str(function),
        "functions": functions,
        "warm": len(uss),
        "rss_per_warm_mb": round(statistics.mean(uss) / MiB, 1),
        "rss_per_warm_mb_measure": "USS (pages held only by that instance)",
        "resident_per_warm_mb": round(statistics.mean(rss) / MiB, 1),
        "scale_from_zero_s": round(scale_from_zero_s, 4),
        "scale_from_zero_start": start_kind,
        "deploy_all_s": round(deploy_s, 1),
    }
