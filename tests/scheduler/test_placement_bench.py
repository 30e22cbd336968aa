"""`thaw bench placement`: one placement decision over the scheduler's own state."""

from thaw.bench.placement import REFERENCE_FUNCTIONS, REFERENCE_NODES, run_placement_bench


def test_placement_bench_reports_its_figures() -> None:
    # The 1 ms target is checked by running `thaw bench placement --json` on a quiet
    # machine, not here: tests assert behaviour, timings on a shared runner are noise.
    result = run_placement_bench(functions=300, nodes=100, decisions=500)
    assert 0 < result["wall"]["p50_ms"] <= result["wall"]["p99_ms"]
    assert (result["functions"], result["nodes"], result["decisions"]) == (300, 100, 500)
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    reference = result["reference"]
    assert (reference["functions"], reference["nodes"]) == (REFERENCE_FUNCTIONS,
                                                            REFERENCE_NODES)
    assert 0 < reference["p50_ms"] <= reference["p99_ms"] <= reference["max_ms"]
    assert result["ratio_p99"] == round(result["p99_ms"] / reference["p99_ms"], 2)
    assert result["meets_goal"] is (result["p99_ms"] <= result["goal_p99_ms"])
