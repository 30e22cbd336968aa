"""`thaw bench placement`: one placement decision over realistic candidate lists."""

from thaw.bench.placement import run_placement_bench


def test_placement_bench_reports_its_figures() -> None:
    # The 1 ms target is checked by running `thaw bench placement --json` on a quiet
    # machine, not here: tests assert behaviour, timings on a shared runner are noise.
    result = run_placement_bench(functions=300, nodes=100)
    assert set(result) == {"functions", "nodes", "p50_ms", "p99_ms"}
    assert (result["functions"], result["nodes"]) == (300, 100)
    assert 0 < result["p50_ms"] <= result["p99_ms"]
