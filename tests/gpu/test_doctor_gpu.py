"""`thaw doctor gpu` and `thaw bench restore --device cuda` on a real GPU: every check
passes within the budget, and the bench restores into a slice at a real fraction of the
pinned ceiling. Skipped unless CuPy imports and sees a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.gpu.gpus import NEEDS_CUPY_GPU
from thaw.ops.doctor_checks import CHECK_NAMES
from thaw.ops.doctor_run import DEFAULT_BUDGET_S

pytestmark = NEEDS_CUPY_GPU


@pytest.mark.timeout(int(DEFAULT_BUDGET_S) + 120)
def test_doctor_gpu_passes_every_check_within_its_budget() -> None:
    done = subprocess.run([sys.executable, "-m", "thaw.ops", "doctor", "gpu"],
                          capture_output=True, text=True, timeout=DEFAULT_BUDGET_S + 90)
    document = json.loads(done.stdout)
    failed = {name: c["error"] for name, c in document["checks"].items() if not c["ok"]}
    assert done.returncode == 0, json.dumps({"failed": failed, "missing": document["missing"]})
    assert document["ok"] is True and document["error"] == ""
    assert list(document["checks"]) == list(CHECK_NAMES)
    assert document["elapsed_s"] <= DEFAULT_BUDGET_S
    pinned = document["checks"]["pinned_h2d"]
    assert pinned["h2d_gbps"] > 0 and pinned["ratio"] >= 0.5
    model = document["checks"]["model_restore"]
    assert model["weight_bytes"] >= 1_400_000_000 - 64 * 4096 * 4
    assert model["device"].startswith("cuda") and model["ratio"] > 0


@pytest.mark.timeout(300)
def test_bench_restore_on_cuda_reports_its_ratio_to_the_pinned_ceiling() -> None:
    done = subprocess.run([sys.executable, "-m", "thaw.ops", "bench", "restore", "--device",
                           "cuda", "--size", "512MiB", "--json"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["device"] == "cuda" and result["bytes"] == 512 << 20
    assert result["h2d_gbps"] > 1 and result["ratio"] > 0
