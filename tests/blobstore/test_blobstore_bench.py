"""`thaw bench restore` at a tiny size: the shape of its JSON and that it restores right."""

from __future__ import annotations

import json

from thaw.bench.restore import run_restore_bench


def test_restore_bench_reports_every_figure() -> None:
    result = run_restore_bench(3 * 1024 * 1024 + 5, workers=2, chunk_size=1 << 20, rounds=1)
    assert set(result) == {"bytes", "restore_gbps", "memcpy_gbps", "ratio",
                           "disk_restore_gbps", "disk_ratio", "workers", "chunk_size"}
    assert result["bytes"] == 3 * 1024 * 1024 + 5
    assert (result["workers"], result["chunk_size"]) == (2, 1 << 20)
    for key in ("restore_gbps", "memcpy_gbps", "ratio", "disk_restore_gbps", "disk_ratio"):
        assert result[key] > 0
    assert json.loads(json.dumps(result)) == result
