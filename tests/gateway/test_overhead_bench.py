"""`thaw bench overhead` end to end, small: the figures are there and consistent (the
numbers themselves are the benchmark's business, not a test's)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from thaw.ops.bench import bench

KEYS = {"direct_p50_ms", "platform_p50_ms", "added_p50_ms", "added_p99_ms", "rps"}


def test_overhead_bench_reports_both_paths_side_by_side() -> None:
    result = CliRunner().invoke(bench, ["overhead", "--requests", "200", "--concurrency", "8",
                                        "--duration", "1", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures.keys() >= KEYS
    assert 0 < figures["direct_p50_ms"] < figures["platform_p50_ms"]
    added = figures["platform_p50_ms"] - figures["direct_p50_ms"]
    assert abs(figures["added_p50_ms"] - added) < 0.002  # both sides rounded to 1 µs
    assert figures["direct_p50_ms"] <= figures["agent_p50_ms"]
    assert figures["rps"] > 0 and figures["concurrency"] == 8
    # Warm calls after the first ride kept leases: most make no scheduler round trip.
    assert figures["lease_reuses"] > 200
