"""`thaw bench density`: how much memory each extra warm instance of a model costs on
one node.

Two figures, both USS (pages only that process holds; the rest is shared
copy-on-write):
- per instance (`rss_per_warm_mb`): one copy of the bundle, scaled to `instances` warm
  instances (max_concurrency 1, brought up by concurrent calls); they fork from the
  snapshot's restored template (docs/density.md), whose own USS is reported beside
  (`restored_template_mb`). The reference is the same measured on a second platform
  with restored templates off (the agent's `restored_templates` setting): every
  instance restored from the template.
- per copy (`rss_per_warm_copy_mb`): `functions` copies of the bundle under different
  names, `warm` of them with one warm instance each (copies share weights through the
  blobstore's content-addressed arenas and imports through one template); each copy's
  figure is its instance's USS plus its restored template's. And the time to bring one
  more copy up from zero (a restore, through the gateway).
"""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from thaw.bench.platform import PlatformFactory, service_environment
from thaw.core.httptls import local_client_context
from thaw.core.spec import pack_bundle
from thaw.snapshotter.runtime.restored_template import RESTORED_TEMPLATE_COMM

MiB = 1024 * 1024
# Telemetry is sampled on scrape; give a fresh instance's pages a moment to settle.
SETTLE_SECONDS = 1.0
# The per-instance copy is scaled up by rounds of 2 * `instances` concurrent calls (of
# the bench's payload, so each instance writes what a warm instance of it writes): at
# zero instances they all wait for a place and each start takes one (max_concurrency
# 1). At most this many rounds to reach `instances`.
SCALE_ROUNDS = 20
# The agent setting that turns restored templates off, for the reference.
RESTORED_TEMPLATES_OFF = {"THAW_RESTORED_TEMPLATES": "false"}


def _copy(src: Path, dest: Path, name: str, instances: int = 0) -> Path:
    """The bundle under `name`, kept warm for an hour; with `instances`, scaled to that
    many instances of one call each."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    text = (dest / "thaw.toml").read_text()
    text = re.sub(r'(?m)^name\s*=.*$', f'name = "{name}"', text, count=1)
    scaling = {"scaledown_window": '"3600s"'}
    if instances:
        scaling.update(max_instances=str(instances), max_concurrency="1",
                       target_concurrency="1", min_instances="0")
    for key in scaling:
        text = re.sub(rf'(?m)^{key}\s*=.*$\n?', "", text)
    lines = "".join(f"{key} = {value}\n" for key, value in scaling.items())
    text = text.replace("[scaling]\n", "[scaling]\n" + lines, 1) \
        if "[scaling]\n" in text else text + "\n[scaling]\n" + lines
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


def _restored_templates() -> dict[int, float]:
    """pid -> USS bytes of every restored template this process's platforms run."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() == RESTORED_TEMPLATE_COMM:
                found[proc.pid] = float(proc.memory_full_info().uss)
        except psutil.Error:
            continue
    return found


def _deploy(http: httpx.Client, bundle: Path, name: str) -> None:
    resp = http.post("/v1/functions", params={"wait": "true"}, content=pack_bundle(str(bundle)))
    resp.raise_for_status()
    if resp.json()["state"] != "ready":
        raise RuntimeError(f"{name} did not deploy: {resp.json()}")


def _scale_up(http: httpx.Client, name: str, instances: int,
              payload: dict[str, Any]) -> set[str]:
    """Rounds of concurrent calls until `instances` instances answered."""
    seen: set[str] = set()
    with concurrent.futures.ThreadPoolExecutor(instances * 2) as pool:
        for _ in range(SCALE_ROUNDS):
            answers = list(pool.map(lambda _: http.post(f"/fn/dev/{name}", json=payload),
                                    range(instances * 2)))
            for resp in answers:
                resp.raise_for_status()
                seen.add(resp.headers["X-Thaw-Instance"])
            if len(seen) >= instances:
                return seen
    raise RuntimeError(f"{name} reached {len(seen)} instances, not {instances}")


def _node_memory(http: httpx.Client, home: Path) -> dict[str, tuple[float, float]]:
    time.sleep(SETTLE_SECONDS)
    node = http.get("/v1/nodes").json()["nodes"][0]
    return _instance_memory(node["data_url"], home)


def _per_instance(src: Path, tmp: Path, instances: int, payload: dict[str, Any],
                  platform: PlatformFactory, label: str) -> tuple[float, dict[int, float]]:
    """Mean USS of `instances` warm instances of one copy, and the restored templates
    running then (pid -> USS), on a platform of its own."""
    local = platform(tmp / f"home-{label}", "1x256GiB")
    local.start()
    try:
        http = httpx.Client(base_url=local.url, timeout=900,
                            headers={"Authorization": f"Bearer {local.key}"})
        name = "many"
        _deploy(http, _copy(src, tmp / f"{name}-{label}", name, instances), name)
        seen = _scale_up(http, name, instances, payload)
        memory = _node_memory(http, tmp / f"home-{label}")
        uss = [memory[i][0] for i in seen if i in memory]
        templates = _restored_templates()
        http.close()
    finally:
        local.stop()
    if len(uss) < instances:
        raise RuntimeError(f"telemetry shows {len(uss)} of {instances} instances")
    return statistics.mean(uss), templates


def run_density_bench(function: str, functions: int = 50, warm: int = 20,
                      payload: dict[str, Any] | None = None, *,
                      platform: PlatformFactory, instances: int = 4) -> dict[str, Any]:
    if not 0 < warm < functions:
        raise ValueError("need 0 < warm < functions (one copy is brought up from zero)")
    if instances < 2:
        raise ValueError("need instances >= 2 (the figure is per extra instance)")
    payload = payload if payload is not None else {"texts": ["hello world"]}
    src = Path(function).resolve()
    with tempfile.TemporaryDirectory(prefix="thaw-density-") as tmp:
        per_instance, templates = _per_instance(src, Path(tmp), instances, payload,
                                                platform, "on")
        with service_environment(RESTORED_TEMPLATES_OFF):
            reference, _ = _per_instance(src, Path(tmp), instances, payload, platform,
                                         "off")
        local = platform(Path(tmp) / "home", "1x256GiB")
        local.start()
        try:
            http = httpx.Client(base_url=local.url, timeout=900,
                                headers={"Authorization": f"Bearer {local.key}"})
            names = [f"copy-{i:03d}" for i in range(functions)]
            deploy_started = time.perf_counter()
            for name in names:
                _deploy(http, _copy(src, Path(tmp) / name, name), name)
            deploy_s = time.perf_counter() - deploy_started
            warmed = []
            for name in names[:warm]:
                resp = http.post(f"/fn/dev/{name}", json=payload)
                resp.raise_for_status()
                warmed.append(resp.headers["X-Thaw-Instance"])
            # One restored template per warm copy, each copy's own: measured before
            # one more copy comes up.
            copy_templates = _restored_templates()
            started = time.perf_counter()
            resp = http.post(f"/fn/dev/{names[warm]}", json=payload)
            scale_from_zero_s = time.perf_counter() - started
            resp.raise_for_status()
            start_kind = resp.headers.get("X-Thaw-Start")
            memory = _node_memory(http, Path(tmp) / "home")
            uss = [memory[i][0] for i in warmed if i in memory]
            rss = [memory[i][1] for i in warmed if i in memory]
            http.close()
        finally:
            local.stop()
    per_copy = (sum(uss) + sum(copy_templates.values())) / len(uss)
    return {
        "function": str(function),
        "instances": instances,
        "rss_per_warm_mb": round(per_instance / MiB, 1),
        "rss_per_warm_mb_measure": "mean USS of the warm instances of one function "
                                   "(pages held only by that instance)",
        "restored_template_mb": round(sum(templates.values()) / MiB, 1),
        "restored_templates": len(templates),
        "rss_per_warm_mb_reference": round(reference / MiB, 1),
        "rss_per_warm_mb_reference_measure": "the same with restored templates off "
                                             "(THAW_RESTORED_TEMPLATES=false)",
        "rss_per_warm_ratio": round(per_instance / reference, 3),
        "functions": functions,
        "warm": len(uss),
        "rss_per_warm_copy_mb": round(per_copy / MiB, 1),
        "rss_per_warm_copy_mb_measure": "per warm copy: its instance's USS plus its "
                                        "restored template's",
        "copy_restored_templates": len(copy_templates),
        "resident_per_warm_mb": round(statistics.mean(rss) / MiB, 1),
        "scale_from_zero_s": round(scale_from_zero_s, 4),
        "scale_from_zero_start": start_kind,
        "deploy_all_s": round(deploy_s, 1),
    }
