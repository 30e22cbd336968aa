"""`thaw doctor gpu` without a GPU: how checks are run (JSON shape, time limits, the
budget, exit codes), what the environment probe names as missing, the GPU checks on the
in-memory CUDA fake, and the command itself on this machine (no CUDA device: exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import tomllib

from thaw.bench.restore_cuda import CudaBenchParts
from thaw.bench.slice_probe import InMemorySliceProbe
from thaw.core.errors import ThawError
from thaw.core.spec import pack_bundle, read_bundle
from thaw.ops.doctor_checks import (
    CHECK_NAMES,
    check_driver_fingerprint,
    check_pinned_h2d,
    check_slice_ipc,
    probe_environment,
)
from thaw.ops.doctor_local import BUNDLES, server_timing, write_variant
from thaw.ops.doctor_platform import weights_in_slice
from thaw.ops.doctor_run import (
    EXIT_FAILED,
    EXIT_NO_DEVICE,
    EXIT_OK,
    Check,
    CheckFailed,
    CheckPlan,
    diagnose,
    run_checks,
)
from thaw.platform.cuda import CudaDevices, InMemoryCudaApi, MiB
from thaw.snapshotter.runtime.gpuinfo import GpuFacts, parse_proc_driver

OPEN_570 = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release "
            "Build  (dvs-builder@U16-I3-B03-4-3)  Thu Jan 23 00:27:04 UTC 2025\n"
            "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n")
PROPRIETARY_535 = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 "
                   "19:39:15 UTC 2024\n")


# -- running checks -------------------------------------------------------------------

def test_each_check_gets_a_section_with_ok_its_figures_and_error() -> None:
    def fails() -> dict[str, Any]:
        raise CheckFailed("slice was not zeroed", slice_bytes=64, zeroed=False)

    def breaks() -> dict[str, Any]:
        raise KeyError("gpu")

    def refuses() -> dict[str, Any]:
        raise ThawError("no GPU has room")

    sections = run_checks([Check("good", 5, lambda: {"gbps": 12.5}),
                           Check("bad", 5, fails), Check("buggy", 5, breaks),
                           Check("refused", 5, refuses)], budget_s=60)
    assert list(sections) == ["good", "bad", "buggy", "refused"]
    assert sections["good"]["ok"] is True and sections["good"]["error"] == ""
    assert sections["good"]["gbps"] == 12.5 and sections["good"]["seconds"] >= 0
    assert sections["bad"] == {"ok": False, "error": "slice was not zeroed",
                               "slice_bytes": 64, "zeroed": False,
                               "seconds": sections["bad"]["seconds"]}
    assert sections["buggy"]["ok"] is False and "KeyError" in sections["buggy"]["error"]
    assert sections["refused"] == {"ok": False, "error": "no GPU has room",
                                   "seconds": sections["refused"]["seconds"]}
    json.dumps(sections)


def test_a_check_past_its_time_limit_fails_and_the_next_one_still_runs() -> None:
    release = threading.Event()
    try:
        sections = run_checks([Check("stuck", 0.3, lambda: {"never": release.wait(30)}),
                               Check("after", 5, lambda: {"ran": True})], budget_s=60)
    finally:
        release.set()
    assert sections["stuck"]["ok"] is False
    assert sections["stuck"]["error"].startswith("timed out after")
    assert "never" not in sections["stuck"]
    assert sections["after"] == {"ran": True, "ok": True, "error": "",
                                 "seconds": sections["after"]["seconds"]}


def test_checks_share_one_budget_and_the_rest_are_not_run_once_it_is_spent() -> None:
    now = [0.0]
    limits: list[str] = []

    def takes(seconds: float, name: str) -> Check:
        def run() -> dict[str, Any]:
            now[0] += seconds
            limits.append(name)
            return {}
        return Check(name, 400, run)

    sections = run_checks([takes(300, "first"), takes(200, "second"), takes(1, "third")],
                          budget_s=480, clock=lambda: now[0])
    assert limits == ["first", "second"]
    assert sections["first"]["ok"] and sections["second"]["ok"]
    assert sections["third"] == {"ok": False,
                                 "error": "not run: the run's budget of 480s was spent"}


def test_the_run_keeps_part_of_its_budget_for_closing_the_plan() -> None:
    now = [0.0]

    def slow() -> dict[str, Any]:
        now[0] += 440
        return {}

    plan = CheckPlan([Check("a", 500, slow), Check("b", 5, lambda: {})],
                     close=lambda: now.__setitem__(0, now[0] + 30))
    result = diagnose({}, [], "", lambda: plan, ["a", "b"], budget_s=480, reserve_s=45,
                      spent_s=5, clock=lambda: now[0])
    assert result.document["checks"]["b"]["error"] == (
        "not run: the run's budget of 430s was spent")
    assert result.document["budget_s"] == 480
    assert result.document["elapsed_s"] == 475 and result.exit_code == EXIT_FAILED


def _document(plan: CheckPlan, no_device: str = "") -> Any:
    return diagnose({"cupy": ""}, ["CuPy: pip install 'thaw[cuda]'"], no_device,
                    lambda: plan, ["a", "b"], budget_s=60)


def test_exit_codes_say_passed_failed_or_no_device() -> None:
    closed: list[bool] = []
    passed = _document(CheckPlan([Check("a", 5, lambda: {}), Check("b", 5, lambda: {})],
                                 close=lambda: closed.append(True)))
    assert passed.exit_code == EXIT_OK == 0
    assert passed.document["ok"] is True and passed.document["error"] == ""
    assert closed == [True]

    def fails() -> dict[str, Any]:
        raise CheckFailed("ratio 0.2")

    failed = _document(CheckPlan([Check("a", 5, lambda: {}), Check("b", 5, fails)],
                                 close=lambda: closed.append(True)))
    assert failed.exit_code == EXIT_FAILED == 1
    assert failed.document["ok"] is False
    assert failed.document["checks"]["b"]["error"] == "ratio 0.2"
    assert closed == [True, True]
    assert set(failed.document) == {"ok", "error", "environment", "missing", "budget_s",
                                    "elapsed_s", "checks"}


def test_without_a_device_nothing_runs_and_every_check_says_why() -> None:
    def no_plan() -> CheckPlan:
        raise AssertionError("checks must not be built without a device")

    result = diagnose({}, ["CuPy: ..."], "CuPy is not installed", no_plan, ["a", "b"])
    assert result.exit_code == EXIT_NO_DEVICE == 2
    assert result.document["ok"] is False
    assert result.document["error"] == "no CUDA device: CuPy is not installed"
    assert result.document["missing"] == ["CuPy: ..."]
    assert result.document["checks"] == {
        name: {"ok": False, "error": "not run: no CUDA device: CuPy is not installed"}
        for name in ("a", "b")}


# -- the environment ------------------------------------------------------------------

class FakeRuntime:
    def __init__(self, count: int, error: Exception | None = None) -> None:
        self.count, self.error = count, error

    def getDeviceCount(self) -> int:  # noqa: N802 - CuPy's name
        if self.error is not None:
            raise self.error
        return self.count

    def driverGetVersion(self) -> int:  # noqa: N802
        return 12080

    def getDeviceProperties(self, index: int) -> dict[str, Any]:  # noqa: N802
        return {"name": b"NVIDIA H100 80GB HBM3"}


def importer(modules: dict[str, Any]) -> Any:
    def load(name: str) -> Any:
        if name not in modules:
            raise ImportError(f"No module named {name!r}")
        return modules[name]
    return load


def fake_cupy(runtime: FakeRuntime) -> Any:
    cuda = type("cuda", (), {"runtime": runtime})
    return type("cupy", (), {"__version__": "13.6.0", "cuda": cuda})


def fake_torch(cuda: str | None) -> Any:
    return type("torch", (), {"__version__": "2.13.0", "version": type("v", (), {"cuda": cuda})})


def test_the_probe_names_everything_missing_and_no_cupy_means_no_device() -> None:
    env = probe_environment(importer({}), facts=GpuFacts, kernel=lambda: None)
    assert env.no_device == "CuPy is not installed"
    text = " | ".join(env.missing)
    assert "CuPy: pip install 'thaw[cuda]'" in text
    assert "pynvml: pip install 'thaw[cuda]' (nvidia-ml-py)" in text
    assert "torch (the platform checks deploy torch functions)" in text
    json.dumps(env.as_json())


def test_a_cpu_only_torch_is_named_but_the_gpu_is_there() -> None:
    env = probe_environment(
        importer({"cupy": fake_cupy(FakeRuntime(1)), "pynvml": object(),
                  "torch": fake_torch(None)}),
        facts=lambda: GpuFacts(driver="570.86.15"),
        kernel=lambda: parse_proc_driver(OPEN_570))
    assert env.no_device == ""
    assert env.gpus == ("NVIDIA H100 80GB HBM3",)
    assert (env.driver, env.cuda_driver, env.cupy) == ("570.86.15", "12.8", "13.6.0")
    assert env.missing == ("torch's CUDA build: torch 2.13.0 is CPU-only; install torch's "
                           "CUDA build from the PyTorch CUDA wheel index (docs/gpu.md, "
                           "\"Checking a GPU node\")",)
    assert env.as_json()["torch_cuda"] == ""


def test_no_driver_or_no_gpu_means_no_device() -> None:
    broken = probe_environment(
        importer({"cupy": fake_cupy(FakeRuntime(0, RuntimeError("cudaErrorNoDevice"))),
                  "pynvml": object(), "torch": fake_torch("12.8")}),
        facts=GpuFacts, kernel=lambda: None)
    assert broken.no_device.startswith("CUDA cannot start: cudaErrorNoDevice")
    assert any(m.startswith("the NVIDIA driver") for m in broken.missing)
    none = probe_environment(
        importer({"cupy": fake_cupy(FakeRuntime(0)), "pynvml": object(),
                  "torch": fake_torch("12.8")}), facts=GpuFacts, kernel=lambda: None)
    assert none.no_device == "the driver sees no GPU"


# -- a: the driver fingerprint --------------------------------------------------------

@pytest.mark.parametrize("text,version,module", [(OPEN_570, "570.86.15", "open"),
                                                  (PROPRIETARY_535, "535.183.01",
                                                   "proprietary")])
def test_the_driver_the_capture_records_matches_the_node(text: str, version: str,
                                                         module: str) -> None:
    figures = check_driver_fingerprint(
        parse_proc_driver(text),
        GpuFacts(model="NVIDIA H100", driver=version, cuda="12.8", compute_capability="9.0"),
        node_driver=version)
    assert figures["capture_driver"] == figures["nvml_driver"] == version
    assert figures["kernel_module"] == module and figures["compute_capability"] == "9.0"


def test_a_driver_the_node_reads_differently_fails_the_check() -> None:
    facts = GpuFacts(model="NVIDIA H100", driver="570.86.15", cuda="12.8",
                     compute_capability="9.0")
    with pytest.raises(CheckFailed) as caught:
        check_driver_fingerprint(parse_proc_driver(OPEN_570), facts, node_driver="for")
    assert "node_driver is ''" in caught.value.message
    assert caught.value.figures["capture_driver"] == "570.86.15"
    with pytest.raises(CheckFailed, match="no NVRM line"):
        check_driver_fingerprint(None, facts, node_driver="570.86.15")
    with pytest.raises(CheckFailed, match="compute capability"):
        check_driver_fingerprint(parse_proc_driver(OPEN_570),
                                 GpuFacts(driver="570.86.15"), node_driver="570.86.15")


# -- b and c on the fake --------------------------------------------------------------

class HeapBuffers:
    def allocate(self, nbytes: int) -> memoryview:
        return memoryview(bytearray(nbytes))

    def free(self, buffer: memoryview) -> None:
        del buffer


def fake_parts(api: InMemoryCudaApi) -> CudaBenchParts:
    return CudaBenchParts(devices=CudaDevices(api, reserve_bytes=0, instance_overhead_bytes=0),
                          api=api, tier_memory=None, baseline_memory=HeapBuffers(),
                          probe=InMemorySliceProbe(api), gpu_name="Fake GPU")


def test_pinned_h2d_reports_both_rates_and_fails_below_the_floor() -> None:
    api = InMemoryCudaApi([64 * MiB])
    figures = check_pinned_h2d(fake_parts(api), 2 * MiB, rounds=1, min_ratio=0.0)
    assert figures["bytes"] == 2 * MiB and figures["gpu"] == "Fake GPU"
    assert figures["restore_gbps"] > 0 and figures["h2d_gbps"] > 0 and figures["ratio"] > 0
    with pytest.raises(CheckFailed, match="not page-locked") as caught:
        check_pinned_h2d(fake_parts(api), 2 * MiB, rounds=1, min_ratio=1e9)
    assert caught.value.figures["ratio"] > 0 and caught.value.figures["h2d_gbps"] > 0
    assert api.allocations == {}


def test_slice_ipc_sees_zeros_the_agents_bytes_and_zeros_again() -> None:
    api = InMemoryCudaApi([64 * MiB])
    devices = CudaDevices(api, reserve_bytes=0, instance_overhead_bytes=0)
    figures = check_slice_ipc(devices, InMemorySliceProbe(api), 4 * MiB)
    assert figures["zeroed_on_allocate"] and figures["agent_copy_visible"]
    assert figures["zeroed_after_release"] and figures["slice_bytes"] == 4 * MiB
    assert api.allocations == {}


class NoScrubApi(InMemoryCudaApi):
    """A driver under which the backend's memsets do nothing."""

    def memset_async(self, device: int, ptr: int, value: int, nbytes: int,
                     stream: int) -> None:
        self.calls.append(("memset", device, ptr, value, nbytes, stream))


def test_slice_ipc_catches_a_slice_handed_out_with_the_last_tenants_bytes() -> None:
    api = NoScrubApi([64 * MiB])
    devices = CudaDevices(api, reserve_bytes=0, instance_overhead_bytes=0)
    with pytest.raises(CheckFailed, match="zeroed_after_release") as caught:
        check_slice_ipc(devices, InMemorySliceProbe(api), 4 * MiB)
    assert caught.value.figures["agent_copy_visible"] is True
    assert api.allocations == {}


# -- bundles --------------------------------------------------------------------------

def test_variants_of_the_doctors_bundles_are_valid_bundles(tmp_path: Path) -> None:
    folder = write_variant(BUNDLES / "weights", tmp_path / "w", "doctor-many-3",
                           gpu_memory=(64 << 20) + 1,
                           settings={"weight_bytes": 1024, "seed": 3})
    doc = tomllib.loads((folder / "thaw.toml").read_text())
    assert doc["name"] == "doctor-many-3" and doc["handler"] == "app:Weights"
    assert doc["resources"]["gpu_memory"] == "65MiB"
    assert doc["scaling"]["scaledown_window"] == "0s"
    assert json.loads((folder / "doctor_settings.json").read_text()) == {
        "weight_bytes": 1024, "seed": 3}
    spec = read_bundle(pack_bundle(str(folder)))
    assert spec is not None
    fresh = write_variant(BUNDLES / "fork_poisoned", tmp_path / "f", "doctor-fork",
                          snapshot=False, handler="app:ForkPoisoned")
    assert tomllib.loads((fresh / "thaw.toml").read_text())["snapshot"] == {"enabled": False}
    read_bundle(pack_bundle(str(fresh)))


def test_server_timing_and_the_weights_verdict() -> None:
    assert server_timing("queue;dur=1.5, restore;dur=250, run;dur=x, total;dur=300") == {
        "queue": 0.0015, "restore": 0.25, "total": 0.3}
    good = {"checksum": "7", "setup_checksum": "7", "device": "cuda:0",
            "weight_bytes": 1000, "torch_allocated_bytes": 0}
    assert weights_in_slice(good, "cuda") == []
    copied = {**good, "torch_allocated_bytes": 1000}
    assert "copied, not viewed in the slice" in weights_in_slice(copied, "cuda")[0]
    assert weights_in_slice({**good, "checksum": "8"}, "host") == [
        "its weights differ from the ones setup() made"]
    assert weights_in_slice({**good, "torch_allocated_bytes": -1}, "cuda") == []
    assert weights_in_slice({**good, "device": "cpu"}, "cuda") == [
        "its weights are on cpu, not the GPU"]


# -- the command ----------------------------------------------------------------------

def _gpu_here() -> bool:
    try:
        import cupy  # type: ignore[import-not-found]

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


@pytest.mark.skipif(_gpu_here(), reason="this machine has a GPU (tests/gpu runs the doctor)")
def test_doctor_gpu_without_a_gpu_exits_2_saying_no_cuda_device() -> None:
    done = subprocess.run([sys.executable, "-m", "thaw.ops", "doctor", "gpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    document = json.loads(done.stdout)
    assert document["ok"] is False
    assert document["error"].startswith("no CUDA device: ")
    assert "no CUDA device" in done.stderr
    assert any("CuPy" in m for m in document["missing"])
    assert list(document["checks"]) == list(CHECK_NAMES)
    assert all(not c["ok"] and c["error"].startswith("not run: no CUDA device")
               for c in document["checks"].values())


def test_doctor_gpu_help_names_its_checks() -> None:
    done = subprocess.run([sys.executable, "-m", "thaw.ops", "doctor", "gpu", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "exit 0 when every check" in " ".join(done.stdout.split())
