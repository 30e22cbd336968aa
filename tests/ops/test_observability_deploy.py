"""The Prometheus alerting rules and the Grafana dashboard shipped under ops/deploy/: the
rules are Prometheus rule groups (checked by `promtool` where it is installed, and by a
strict structural check everywhere), the dashboard has what Grafana needs to import it
(a JSON schema), and every metric either one queries is one the code exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "ops" / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "ops" / "deploy" / "grafana" / "thaw.json"
# Where the code registers its metrics: prometheus_client's constructors, first argument.
EXPORTED = re.compile(
    r'\b(?:Counter|Gauge|Histogram|Summary|GaugeMetricFamily|CounterMetricFamily)\(\s*'
    r'"(thaw_[a-z0-9_]+)"')
USED = re.compile(r"\bthaw_[a-z0-9_]+")
DURATION = re.compile(r"^[0-9]+(ms|s|m|h|d|w|y)$")
# A histogram is queried through these series.
SERIES_SUFFIXES = ("_bucket", "_sum", "_count")


def exported_metrics() -> set[str]:
    names: set[str] = set()
    for folder in ("gateway", "scheduler", "platform", "blobstore", "snapshotter", "core"):
        for path in (REPO / folder).rglob("*.py"):
            names.update(EXPORTED.findall(path.read_text()))
    return names


def metric_of(series: str, exported: set[str]) -> str:
    if series in exported:
        return series
    for suffix in SERIES_SUFFIXES:
        if series.endswith(suffix) and series.removesuffix(suffix) in exported:
            return series.removesuffix(suffix)
    return series


def rules() -> dict[str, Any]:
    loaded = yaml.safe_load(RULES.read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_the_code_exports_the_metrics_this_check_knows() -> None:
    exported = exported_metrics()
    # The scan finds the registrations (a broken regex would pass everything below).
    assert {"thaw_invocations_total", "thaw_invocation_stage_seconds",
            "thaw_scheduler_events_total", "thaw_device_memory_used_bytes",
            "thaw_alert_notices_total", "thaw_alerts_firing"} <= exported


def test_the_rules_are_prometheus_rule_groups_on_exported_metrics() -> None:
    doc = rules()
    assert set(doc) == {"groups"} and doc["groups"]
    exported = exported_metrics()
    names: set[str] = set()
    group_names: set[str] = set()
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group
        assert group["name"] not in group_names
        group_names.add(group["name"])
        assert group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels",
                                 "annotations"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert rule["alert"] not in names
            names.add(rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "for" in rule:
                assert DURATION.match(rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"]
            assert all(isinstance(v, str) for v in rule["annotations"].values())
            used = USED.findall(rule["expr"])
            assert used, f"{rule['alert']} queries no thaw metric"
            for series in used:
                assert metric_of(series, exported) in exported, (
                    f"{rule['alert']}: {series} is not a metric thaw exports")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (Debian's prometheus package, .ci/run)")
        pytest.skip("promtool is not installed")
    return found


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(g["rules"]) for g in rules()["groups"])
    assert f"SUCCESS: {count} rules found" in result.stdout


# What Grafana needs to import a dashboard and draw each panel.
TARGET = {"type": "object", "required": ["refId", "expr", "datasource"],
          "properties": {"refId": {"type": "string", "pattern": "^[A-Z]$"},
                         "expr": {"type": "string", "minLength": 1},
                         "legendFormat": {"type": "string"},
                         "datasource": {"$ref": "#/$defs/datasource"}}}
GRID = {"type": "object", "required": ["x", "y", "w", "h"], "additionalProperties": False,
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 23},
                       "y": {"type": "integer", "minimum": 0},
                       "w": {"type": "integer", "minimum": 1, "maximum": 24},
                       "h": {"type": "integer", "minimum": 1}}}
DASHBOARD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {"datasource": {"type": "object", "required": ["type", "uid"],
                             "properties": {"type": {"const": "prometheus"},
                                            "uid": {"type": "string"}}}},
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "time", "templating"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "time": {"type": "object", "required": ["from", "to"]},
        "refresh": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "templating": {"type": "object", "required": ["list"], "properties": {
            "list": {"type": "array", "items": {
                "type": "object", "required": ["name", "type"],
                "properties": {"name": {"type": "string", "pattern": "^[a-z_]+$"},
                               "type": {"enum": ["datasource", "query", "custom",
                                                 "interval", "constant"]}}}}}},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["id", "type", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": ["row", "timeseries", "stat", "gauge", "table",
                                  "bargauge", "heatmap", "text"]},
                "title": {"type": "string", "minLength": 1},
                "gridPos": GRID,
                "datasource": {"$ref": "#/$defs/datasource"},
                "targets": {"type": "array", "items": TARGET},
            },
            "if": {"properties": {"type": {"const": "row"}}},
            "then": {"required": ["panels"]},
            "else": {"required": ["datasource", "targets"],
                     "properties": {"targets": {"minItems": 1}}}}},
    },
}


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_the_dashboard_is_one_grafana_imports() -> None:
    doc = dashboard()
    jsonschema.Draft202012Validator(DASHBOARD_SCHEMA).validate(doc)
    panels = doc["panels"]
    assert len({p["id"] for p in panels}) == len(panels)  # ids are unique
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(set(refs)) == len(refs), p["title"]
    # No two panels overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    variables = {v["name"] for v in doc["templating"]["list"]}
    for p in panels:
        for t in p.get("targets", []):
            for var in re.findall(r"\$\{?([a-z_]+)", t["expr"]):
                assert var in variables or var.startswith("__"), (p["title"], var)


def _dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"]
            for t in p.get("targets", [])]


def test_the_dashboard_queries_exported_metrics() -> None:
    exported = exported_metrics()
    for title, expr in _dashboard_exprs():
        used = USED.findall(expr)
        assert used, f"{title} queries no thaw metric"
        for series in used:
            assert metric_of(series, exported) in exported, (
                f"{title}: {series} is not a metric thaw exports")


def test_promtool_parses_the_dashboard_queries(tmp_path: Path) -> None:
    """Each query, with Grafana's variables given values, as a recording rule:
    promtool parses its PromQL."""
    promtool = _promtool()
    recorded = [{"record": f"thaw:dashboard_query:{i}",
                 "expr": expr.replace("$__rate_interval", "5m")
                             .replace("${datasource}", "").replace("$function", ".*")}
                for i, (_, expr) in enumerate(_dashboard_exprs())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(recorded)} rules found" in result.stdout
