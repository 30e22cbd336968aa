"""Metering end to end (gateway/usage.py, scheduler/usage.py): a known workload on the
real platform comes back from /v1/usage, JSON and CSV, with the totals it must have."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningPlatform
from tests.gateway.conftest import BUNDLES, deploy_once
from thaw.gateway.timing import PATH_STAGES

GiB = 1024**3
SLICE_GIB = 256 / 1024  # the fixture's resources.gpu_memory
COMPUTE_SHARE = 0.5  # its resources.gpu_compute = 50
SLEEP_SECONDS = 0.15
# The JSON document rounds seconds to the microsecond.
ROUNDING = 1e-5
TIMING = re.compile(r"(\w+);dur=([0-9.]+)")


def stages(resp: httpx.Response) -> list[tuple[str, float]]:
    return [(name, float(ms) / 1000)
            for name, ms in TIMING.findall(resp.headers.get("Server-Timing", ""))]


@pytest.fixture(scope="module")
def workload(platform: RunningPlatform) -> dict[str, float]:
    """Five calls of a known size and length, and one that fails; what the client saw."""
    name = deploy_once(platform, BUNDLES / "metered")
    since = time.time() - 1
    seen = {"calls": 0, "errors": 0, "cold": 0, "bytes_in": 0, "bytes_out": 0,
            "sleep": 0.0, "latency": 0.0, "run": 0.0, "restore": 0.0}
    bodies = [{"seconds": SLEEP_SECONDS, "answer_bytes": 1000 * i, "pad": "y" * (300 * i)}
              for i in range(5)] + [{"fail": True, "pad": "z" * 77}]
    for body in bodies:
        content = json.dumps(body).encode()
        began = time.perf_counter()
        resp = platform.http.post(f"/fn/dev/{name}", content=content,
                                  headers={"Content-Type": "application/json"})
        seen["latency"] += time.perf_counter() - began
        assert resp.status_code == (500 if body.get("fail") else 200), resp.text
        seen["calls"] += 1
        seen["errors"] += resp.status_code >= 400
        seen["bytes_in"] += len(content)
        seen["bytes_out"] += len(resp.content)
        seen["sleep"] += float(body.get("seconds", 0.0))  # type: ignore[arg-type]
        seen["cold"] += resp.headers["X-Thaw-Start"] != "warm"
        for stage, seconds in stages(resp):
            if stage == "run":
                seen["run"] += seconds
            elif stage not in ("queue", "total") and stage not in PATH_STAGES:
                seen["restore"] += seconds
    seen["since"] = since
    seen["until"] = time.time() + 1
    return seen


def usage(platform: RunningPlatform, seen: dict[str, float], **params: str) -> httpx.Response:
    resp = platform.http.get("/v1/usage", params={
        "from": str(seen["since"]), "to": str(seen["until"]),
        "function": "usage-metered", **params})
    assert resp.status_code == 200, resp.text
    return resp


def test_a_known_workload_has_the_expected_totals(platform: RunningPlatform,
                                                  workload: dict[str, float]) -> None:
    doc = usage(platform, workload).json()
    assert doc["group_by"] == "function" and doc["tenant"] == "dev"
    assert [row["key"] for row in doc["rows"]] == ["usage-metered"]
    totals = doc["totals"]
    assert doc["rows"][0] == {"key": "usage-metered", "start": None, **totals}
    assert totals["invocations"] == workload["calls"] == 6
    assert totals["errors"] == workload["errors"] == 1
    assert totals["cold_starts"] == workload["cold"] >= 1
    assert totals["bytes_in"] == workload["bytes_in"]
    assert totals["bytes_out"] == workload["bytes_out"]
    # The wall time lies between what the handler surely spent (its sleeps, and the run
    # times the node reported) and what the client waited in all.
    wall = totals["wall_seconds"]
    assert max(workload["sleep"], workload["run"]) <= wall + ROUNDING
    assert wall <= workload["latency"]
    assert totals["gib_seconds"] == pytest.approx(SLICE_GIB * wall, abs=ROUNDING)
    assert totals["compute_seconds"] == pytest.approx(COMPUTE_SHARE * wall, abs=ROUNDING)
    # The cold start's stages, as Server-Timing told the client.
    assert totals["restore_seconds"] == pytest.approx(workload["restore"], abs=1e-3)
    assert totals["restore_seconds"] > 0


def test_csv_and_time_rows_add_up_to_the_same_totals(platform: RunningPlatform,
                                                     workload: dict[str, float]) -> None:
    totals = usage(platform, workload).json()["totals"]
    for params, headers in (({"format": "csv"}, {}),
                            ({"group_by": "hour"}, {"Accept": "text/csv"}),
                            ({"group_by": "day", "format": "csv"}, {})):
        resp = platform.http.get("/v1/usage", params={
            "from": str(workload["since"]), "to": str(workload["until"]),
            "function": "usage-metered", **params}, headers=headers)
        assert resp.status_code == 200, resp.text
        assert resp.headers["Content-Type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(resp.text)))
        assert rows
        for metric in ("invocations", "errors", "cold_starts", "bytes_in", "bytes_out"):
            assert sum(int(r[metric]) for r in rows) == totals[metric], metric
        for metric in ("wall_seconds", "gib_seconds", "compute_seconds"):
            assert sum(float(r[metric]) for r in rows) == pytest.approx(
                totals[metric], abs=3 * ROUNDING), metric
    doc = usage(platform, workload, group_by="hour").json()
    assert all(row["start"] % 3600 == 0 for row in doc["rows"])
    assert sum(row["invocations"] for row in doc["rows"]) == 6


def test_iso_times_and_bad_parameters(platform: RunningPlatform,
                                      workload: dict[str, float]) -> None:
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(workload["since"] - 3600))
    doc = platform.http.get("/v1/usage", params={"from": iso, "group_by": "day"}).json()
    assert doc["totals"]["invocations"] >= 6
    for params, field in (({"from": "yesterday"}, "from"), ({"to": "2030-13-01"}, "to"),
                          ({"group_by": "week"}, "group_by"), ({"format": "xml"}, "format"),
                          ({"from": "2030-01-02", "to": "2030-01-01"}, "to")):
        resp = platform.http.get("/v1/usage", params=params)
        assert resp.status_code == 400, (params, resp.text)
        assert resp.json()["error"]["field"] == field, params


def test_thaw_usage(platform: RunningPlatform, workload: dict[str, float],
                    tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THAW_")}
    env.update({"HOME": str(tmp_path), "THAW_HOME": str(tmp_path / "home"),
                "THAW_CONFIG_FILE": str(tmp_path / "absent.toml"), "COLUMNS": "200",
                "THAW_URL": platform.url, "THAW_API_KEY": platform.key})
    span = ["--from", str(workload["since"]), "--to", str(workload["until"]),
            "--function", "usage-metered"]

    def thaw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "thaw.ops", "usage", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    as_json = thaw(*span, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["totals"]["invocations"] == 6
    as_csv = thaw(*span, "--csv", "--group-by", "day")
    assert as_csv.returncode == 0, as_csv.stderr
    assert sum(int(r["invocations"]) for r in csv.DictReader(io.StringIO(as_csv.stdout))) == 6
    table = thaw(*span)
    assert table.returncode == 0, table.stderr
    assert "usage-metered" in table.stdout and "total" in table.stdout
    bad = thaw("--from", "yesterday")
    assert bad.returncode == 1 and "from must be" in bad.stderr


def test_streamed_answers_are_metered_as_relayed(platform: RunningPlatform) -> None:
    name = deploy_once(platform, BUNDLES / "metered_stream")
    since = time.time() - 1
    bytes_in = bytes_out = 0
    for n, accept in ((3, "text/event-stream"), (5, "application/x-ndjson"),
                      (40, "text/event-stream")):
        content = json.dumps({"n": n, "size": 100 * n}).encode()
        with platform.http.stream("POST", f"/fn/dev/{name}", content=content, headers={
                "Content-Type": "application/json", "Accept": accept}) as resp:
            assert resp.status_code == 200
            body = resp.read()
        assert body.count(b'"i"') == n
        bytes_in += len(content)
        bytes_out += len(body)
    resp = platform.http.get("/v1/usage", params={"from": str(since),
                                                  "function": name})
    totals = resp.json()["totals"]
    assert (totals["invocations"], totals["errors"]) == (3, 0)
    assert (totals["bytes_in"], totals["bytes_out"]) == (bytes_in, bytes_out)
    # A GPU function without gpu_compute has the whole device's share.
    assert totals["compute_seconds"] == pytest.approx(totals["wall_seconds"], abs=ROUNDING)
    assert totals["gib_seconds"] == pytest.approx(totals["wall_seconds"] / 8, abs=ROUNDING)
