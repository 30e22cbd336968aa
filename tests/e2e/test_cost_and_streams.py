"""Cost and stream timing on a real platform whose gateway has prices set: each call's
record carries its cost (the metered quantities times the prices), /v1/usage and
`thaw usage` sum it per function and per day, X-Thaw-Cost gives a whole answer's cost
when asked; streamed calls (NDJSON, SSE, the OpenAI route) feed the TTFT and TBT
histograms of /metrics under their function and kind."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import EXAMPLES, FIXTURES, RunningPlatform, running
from thaw.core.prices import GiB, Prices, cost_nanos
from thaw.ops.services import LocalPlatform

PRICES = Prices(per_call=Decimal("0.001"), cpu_second=Decimal("0.00002"),
                gpu_gib_second=Decimal("0.0001"), currency="EUR")
PRICE_ENV = {"THAW_PRICE_PER_CALL": "0.001", "THAW_PRICE_CPU_SECOND": "0.00002",
             "THAW_PRICE_GPU_GIB_SECOND": "0.0001", "THAW_PRICE_CURRENCY": "EUR"}
METERED = Path(__file__).resolve().parents[1] / "gateway" / "bundles" / "metered"
SLEEP = 0.1
COST = re.compile(r"^(\d+)\.(\d{9}) EUR$")


@pytest.fixture(scope="module")
def priced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    """A platform whose gateway prices calls (the settings as environment variables)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in PRICE_ENV.items():
            patch.setenv(key, value)
        home = tmp_path_factory.mktemp("thaw-priced")
        with running(LocalPlatform(home, gateway_port=0, host_devices="1x2GiB")) as p:
            for folder in (METERED, FIXTURES / "paced_stream", EXAMPLES / "tinylm"):
                resp = p.deploy(folder)
                assert resp.status_code == 201 and resp.json()["state"] == "ready", resp.text
            yield p


def nanos_of(header: str) -> int:
    found = COST.match(header)
    assert found, header
    return int(found[1]) * 10**9 + int(found[2])


def records(platform: RunningPlatform, function: str) -> dict[str, tuple[float, int, int]]:
    """invocation id -> (wall seconds, slice bytes, cost nanos) as the scheduler stored them."""
    db = platform.platform.home / "scheduler" / "thaw.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT invocation_id, wall_s, gpu_memory_bytes, cost_nanos "
                            "FROM usage_records WHERE function = ?", (function,))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_calls_carry_their_cost_and_usage_sums_it(priced: RunningPlatform,
                                                  tmp_path: Path) -> None:
    since = time.time() - 1
    asked = priced.invoke("usage-metered", {"seconds": SLEEP},
                          headers={"X-Thaw-Want-Cost": "1", "X-Request-ID": "cost-asked"})
    assert asked.status_code == 200, asked.text
    header_nanos = nanos_of(asked.headers["X-Thaw-Cost"])
    # At least the call, SLEEP seconds of one CPU and of a 256 MiB slice.
    assert header_nanos >= cost_nanos(PRICES, SLEEP, GiB // 4)
    for i in range(3):
        plain = priced.invoke("usage-metered", {"seconds": SLEEP},
                              headers={"X-Request-ID": f"cost-plain-{i}"})
        assert plain.status_code == 200 and "X-Thaw-Cost" not in plain.headers
    # A stream's head leaves before its cost is known: none, even when asked.
    streamed = priced.invoke("paced-stream", {"n": 2, "pause": 0.01},
                             headers={"X-Thaw-Want-Cost": "1"})
    assert streamed.status_code == 200 and "X-Thaw-Cost" not in streamed.headers

    until = time.time() + 1
    span = {"from": str(since), "to": str(until)}
    doc = priced.http.get("/v1/usage", params={**span, "group_by": "function"}).json()
    assert (doc["currency"], doc["priced"]) == ("EUR", True)
    row = next(r for r in doc["rows"] if r["key"] == "usage-metered")
    assert row["invocations"] == 4

    # Each stored record's cost is its metered quantities times the prices, exactly.
    stored = records(priced, "usage-metered")
    assert set(stored) == {"cost-asked", *(f"cost-plain-{i}" for i in range(3))}
    for wall, memory, nanos in stored.values():
        assert memory == GiB // 4
        assert nanos == cost_nanos(PRICES, wall, memory)
    # The header priced the call at answer time; the record a moment later.
    assert header_nanos <= stored["cost-asked"][2]
    assert row["cost_nanos"] == sum(nanos for _, _, nanos in stored.values())
    assert row["cost"] == f"{row['cost_nanos'] // 10**9}.{row['cost_nanos'] % 10**9:09d}"
    # The same from the usage sums: calls, CPU-seconds and GiB-seconds times prices
    # (each call rounded to a nano-unit; the document's seconds to a microsecond).
    expected = (PRICES.per_call * row["invocations"]
                + PRICES.cpu_second * Decimal(str(row["wall_seconds"]))
                + PRICES.gpu_gib_second * Decimal(str(row["gib_seconds"]))) * 10**9
    assert abs(row["cost_nanos"] - expected) <= row["invocations"] + 1

    by_day = priced.http.get("/v1/usage", params={**span, "group_by": "day"}).json()
    assert sum(r["cost_nanos"] for r in by_day["rows"]) == by_day["totals"]["cost_nanos"]
    assert by_day["totals"]["cost_nanos"] == doc["totals"]["cost_nanos"]
    assert by_day["totals"]["cost_nanos"] >= row["cost_nanos"]

    env = {k: v for k, v in os.environ.items() if not k.startswith("THAW_")}
    env.update({"HOME": str(tmp_path), "THAW_HOME": str(tmp_path / "home"),
                "THAW_CONFIG_FILE": str(tmp_path / "absent.toml"), "COLUMNS": "240",
                "THAW_URL": priced.url, "THAW_API_KEY": priced.key})

    def thaw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "thaw.ops", "usage", "--from", since_s,
                               "--to", until_s, "--function", "usage-metered", *args],
                              env=env, capture_output=True, text=True, timeout=120)
    since_s, until_s = span["from"], span["to"]
    as_json = thaw("--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["totals"]["cost"] == row["cost"]
    table = thaw("--group-by", "day")
    assert table.returncode == 0, table.stderr
    assert "cost EUR" in table.stdout and row["cost"] in table.stdout, table.stdout
    by_function = thaw()
    assert by_function.returncode == 0, by_function.stderr
    line = next(x for x in by_function.stdout.splitlines() if "usage-metered" in x)
    assert line.split()[-1] == row["cost"], by_function.stdout


def stream_counts(platform: RunningPlatform) -> dict[tuple[str, str, str], float]:
    """(histogram, function, kind) -> its observation count, from /metrics."""
    text = platform.http.get("/metrics").text
    counts: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("thaw_stream_ttft_seconds", "thaw_stream_tbt_seconds"):
            continue
        for s in family.samples:
            if s.name.endswith("_count"):
                counts[(family.name, s.labels["function"], s.labels["kind"])] = s.value
    return counts


def grew(before: dict[tuple[str, str, str], float], after: dict[tuple[str, str, str], float],
         function: str, kind: str) -> tuple[float, float]:
    """How many TTFT and TBT observations a function's `kind` streams added."""
    def added(name: str) -> float:
        key = (name, function, kind)
        return after.get(key, 0.0) - before.get(key, 0.0)
    return added("thaw_stream_ttft_seconds"), added("thaw_stream_tbt_seconds")


def test_streams_feed_the_ttft_and_tbt_histograms(priced: RunningPlatform) -> None:
    before = stream_counts(priced)
    ndjson = priced.invoke("paced-stream", {"n": 3})
    assert ndjson.status_code == 200
    assert ndjson.headers["Content-Type"].startswith("application/x-ndjson")
    assert [json.loads(x)["i"] for x in ndjson.text.splitlines()] == [0, 1, 2]
    sse = priced.invoke("paced-stream", {"n": 3}, headers={"Accept": "text/event-stream"})
    assert sse.status_code == 200 and sse.text.count("data: {\"i\"") == 3
    # A whole answer is no stream: no observation.
    whole = priced.invoke("usage-metered", {})
    assert whole.status_code == 200
    with priced.http.stream("POST", "/v1/chat/completions", json={
            "model": "tinylm", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 12, "temperature": 0, "stream": True}) as resp:
        assert resp.status_code == 200
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 3
    after = stream_counts(priced)

    # One first chunk per stream; each paced item after the first is a chunk of its own.
    ttft, tbt = grew(before, after, "dev/paced-stream", "ndjson")
    assert ttft == 1 and tbt >= 2, after
    ttft, tbt = grew(before, after, "dev/paced-stream", "sse")
    assert ttft == 1 and tbt >= 2, after
    ttft, tbt = grew(before, after, "dev/tinylm", "openai")
    assert ttft == 1 and tbt >= 1, after
    assert not any(f == "dev/usage-metered" for _, f, _ in after)


def test_openai_answers_carry_their_cost_when_asked(priced: RunningPlatform) -> None:
    chat = {"model": "tinylm", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, "temperature": 0}
    ask = {"X-Thaw-Want-Cost": "1"}
    plain = priced.http.post("/v1/chat/completions", json=chat, headers=ask)
    assert plain.status_code == 200, plain.text
    # tinylm's slice is 16 MiB.
    assert nanos_of(plain.headers["X-Thaw-Cost"]) >= cost_nanos(PRICES, 0.0, 16 * 2**20)
    assert "X-Thaw-Cost" not in priced.http.post("/v1/chat/completions", json=chat).headers
    # A key with a token budget has its answer's tokens counted on another path.
    made = priced.http.post("/v1/keys", json={"name": "cost-tpm", "tpm": 100000})
    assert made.status_code == 201, made.text
    with httpx.Client(base_url=priced.url, timeout=120,
                      headers={"Authorization": f"Bearer {made.json()['key']}"}) as c:
        budgeted = c.post("/v1/chat/completions", json=chat, headers=ask)
    assert budgeted.status_code == 200, budgeted.text
    assert nanos_of(budgeted.headers["X-Thaw-Cost"]) >= cost_nanos(PRICES, 0.0, 16 * 2**20)
