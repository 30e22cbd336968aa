"""The local platform `thaw doctor gpu` runs functions on, and the calls its checks make.

`DoctorPlatform` is `thaw up`'s platform (scheduler, agent, gateway as child processes,
its own home, the gateway on a free port) with the agent on the device backend the
checks ask for, started on first use and shared by them. Bundles come from
ops/doctor_bundles/ (or examples/), copied with the settings each check needs
(`write_variant`); `deploy`, `cold_restore` and `not_quarantined` are the calls the
checks make through the gateway, failing with CheckFailed and what went wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomllib

from thaw.core.spec import pack_bundle
from thaw.ops.doctor_checks import MODEL_BYTES
from thaw.ops.doctor_run import CheckFailed
from thaw.ops.services import LocalPlatform

BUNDLES = Path(__file__).resolve().parent / "doctor_bundles"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# A function with scaledown_window = 0s is reaped within a reconcile pass (1 s) of its
# call; a cold call must find none of its instances warm.
COLD_WAIT_S = 30.0
# Deploys wait for the snapshot build, which runs setup() on the GPU.
DEPLOY_TIMEOUT_S = 240.0
CALL_TIMEOUT_S = 120.0
# Waiting for the services to stop; within ops/doctor_run.py CLOSE_RESERVE_S. Past it the
# doctor exits anyway and the services, its children, get their parent-death signal.
STOP_TIMEOUT_S = 40.0

# What write_variant's settings are written to, beside the bundle's code.
SETTINGS_FILE = "doctor_settings.json"


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
