"""The platform checks of `thaw doctor gpu` run on the host backend: the same deploys,
cold restores, comparisons and quarantine checks the GPU run makes, against a real local
platform (small sizes; on a GPU node tests/gpu runs them on cuda)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from thaw.ops.doctor_checks import Environment
from thaw.ops.doctor_local import DoctorPlatform, PlatformConfig
from thaw.ops.doctor_platform import (
    check_concurrent_restores,
    check_embed_restore,
    check_fork_poisoned,
    check_model_restore,
    platform_checks,
)
from thaw.ops.doctor_run import run_checks

pytestmark = pytest.mark.slow

CONFIG = PlatformConfig(device="host", model_bytes=16 << 20, concurrent=3,
                        concurrent_bytes=4 << 20, host_devices="2x4GiB",
                        pinned_capacity="1GiB")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoctorPlatform]:
    doctor = DoctorPlatform(tmp_path_factory.mktemp("doctor-home"), CONFIG)
    try:
        yield doctor
    finally:
        doctor.close()


def test_a_model_is_restored_with_its_weights_and_a_restore_rate(
        platform: DoctorPlatform, tmp_path: Path) -> None:
    figures = check_model_restore(platform, tmp_path, lambda: {"h2d_gbps": 10.0})
    assert figures["weight_bytes"] == 16 << 20
    assert figures["timed_stage"] in ("fill", "copy", "restore")
    assert figures["restore_gbps"] > 0
    assert figures["ratio"] == pytest.approx(figures["restore_gbps"] / 10.0, abs=1e-3)
    assert figures["device"] == "cpu"


def test_functions_restored_at_once_all_answer_from_their_snapshots(
        platform: DoctorPlatform, tmp_path: Path) -> None:
    figures = check_concurrent_restores(platform, tmp_path)
    assert figures["functions"] == figures["restored"] == 3
    assert figures["max_call_s"] >= figures["median_call_s"] > 0


def test_the_fork_poisoning_function_is_served_cold_twice_without_quarantine(
        platform: DoctorPlatform, tmp_path: Path) -> None:
    figures = check_fork_poisoned(platform, tmp_path)
    assert figures["start_mode"] == "restore"
    # No GPU here: the module could not initialise CUDA, which the cuda run insists on.
    assert figures["initialised_at_import"] is False


def test_embed_restored_answers_what_a_fresh_start_answers(
        platform: DoctorPlatform, tmp_path: Path) -> None:
    figures = check_embed_restore(platform, tmp_path)
    assert figures["max_abs_diff"] <= 1e-5
    assert figures["fresh_start"] == "fresh" and figures["dimensions"] == 384


def test_without_torchs_cuda_build_the_cuda_checks_say_why_they_cannot_run() -> None:
    env = Environment(torch="2.13.0", missing=("torch's CUDA build: torch 2.13.0 is "
                                               "CPU-only; see docs/gpu.md",))
    plan = platform_checks(env, ceiling=dict, config=PlatformConfig(device="cuda"))
    try:
        sections = run_checks(plan.checks, budget_s=60)
    finally:
        plan.close()
    assert list(sections) == ["embed_restore", "model_restore", "concurrent_restores",
                              "fork_poisoned"]
    for section in sections.values():
        assert section["ok"] is False
        assert section["error"].startswith("cannot run: torch's CUDA build")
