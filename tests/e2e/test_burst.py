"""A burst of concurrent first calls to a function at zero instances: every call is
answered, and the platform starts no more instances than max_instances allows
(counted from the scheduler's instance_started events), whatever the number of calls
queued for the cold function. `thaw bench burst` measures the same thing at 1,000
calls; this checks behaviour, not speed."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import REPO
from thaw.bench.burst import burst_bundle, burst_settings, run_burst_bench
from thaw.ops.services import LocalPlatform


def _platform(home: Path, host_devices: str) -> LocalPlatform:
    return LocalPlatform(home, gateway_port=0, host_devices=host_devices)


def test_burst_from_zero_is_answered_within_max_instances() -> None:
    result = run_burst_bench(str(REPO / "examples" / "echo"), calls=200, max_instances=2,
                             max_concurrency=16, platform=_platform)
    assert result["statuses"] == {"200": 200}, result
    assert 1 <= result["starts_started"] <= 2, result
    assert result["restores_started"] == result["starts_started"], result  # snapshots on
    assert result["restores_within_limit"] is True
    # Every 200 came from one of those instances: a call given an instance's first
    # lease reports its restore (an instance started for the queue may find it drained
    # and serve none of the burst), every other call found one warm.
    by_start = result["responses_by_start"]
    assert set(by_start) <= {"restore", "warm"} and sum(by_start.values()) == 200, result
    assert 1 <= by_start.get("restore", 0) <= result["restores_started"], result
    # The warm reference: the same 200 calls again start nothing.
    assert result["reference_warm"]["statuses"] == {"200": 200}
    assert result["reference_warm"]["starts_started"] == 0


def test_burst_bundle_sets_the_scaling_limits(tmp_path: Path) -> None:
    folder = burst_bundle(REPO / "examples" / "echo", tmp_path / "b", "burst", 3, 5)
    text = (folder / "thaw.toml").read_text()
    assert 'name = "burst"' in text
    assert text.count("max_instances") == 1 and "max_instances = 3" in text
    assert text.count("max_concurrency") == 1 and "max_concurrency = 5" in text
    assert "target_concurrency = 8" in text  # the bundle's other [scaling] keys stay
    settings = burst_settings(1000)
    assert int(settings["THAW_MAX_CONNECTIONS_PER_ADDRESS"]) > 1000
    assert int(settings["THAW_QUEUE_LOW_WATER"]) < int(settings["THAW_QUEUE_HIGH_WATER"])
