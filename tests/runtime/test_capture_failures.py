"""A build whose state cannot be snapshotted fails at stage "capture" and names the
attribute path at fault (DESIGN.md §4), so the tenant knows what to move to
on_restore()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import Processes


@pytest.mark.parametrize(
    ("kind", "path", "reason"),
    [
        ("socket", "self.client._sock", "TypeError: cannot pickle 'socket' object"),
        ("thread", "self.items[2]", "TypeError: cannot pickle 'Thread' object (AttributeError: "
         "Can't pickle local object 'Holder.setup.<locals>.<lambda>')"),
        ("lock", "self.cfg['conn']", "TypeError: cannot pickle '_thread.lock' object"),
        ("generator", "self.pending", "TypeError: cannot pickle 'generator' object"),
        ("file", "self.log", "TypeError: cannot pickle '_io.TextIOWrapper' object"),
    ],
)
def test_unpicklable_state_names_its_attribute_path(
    processes: Processes, tmp_path: Path, kind: str, path: str, reason: str
) -> None:
    out = tmp_path / "snapshot"
    process = processes.start(
        "build", "unpicklable_rt", "--out", str(out), env={"UNPICKLABLE_KIND": kind}
    )
    event = process.event()
    assert event == {"event": "failed", "stage": "capture", "reason": reason,
                     "attribute_path": path}
    assert process.wait() == 12
    assert not (out / "snapshot.json").exists()  # no half-written snapshot looks complete


@pytest.mark.parametrize(
    ("bundle", "stage", "code"),
    [("setup_fails_rt", "setup", 11), ("import_fails_rt", "import", 10)],
)
def test_build_failing_before_capture_reports_its_stage(
    processes: Processes, tmp_path: Path, bundle: str, stage: str, code: int
) -> None:
    process = processes.start("build", bundle, "--out", str(tmp_path / "snapshot"))
    event = process.event()
    assert event["event"] == "failed" and event["stage"] == stage
    assert "attribute_path" not in event
    assert process.wait() == code


def test_build_records_the_function_version(processes: Processes, tmp_path: Path) -> None:
    out = tmp_path / "snapshot"
    process = processes.start("build", "counter_rt", "--out", str(out),
                              "--function-version", "v7")
    assert process.event()["event"] == "captured"
    assert process.wait() == 0
    fingerprint = json.loads((out / "snapshot.json").read_text())["fingerprint"]
    assert fingerprint["function_version"] == "v7"
    assert fingerprint["torch"] is None and fingerprint["numpy"] is None


def test_refused_capture_reports_the_input_schema(
    processes: Processes, tmp_path: Path
) -> None:
    """The function runs with fresh starts after a refused capture; its calls are
    still checked against the schema its build read."""
    process = processes.start("build", "typed_unpicklable_rt", "--out",
                              str(tmp_path / "snapshot"))
    event = process.event()
    assert (event["event"], event["stage"], event["attribute_path"]) == (
        "failed", "capture", "self.lock")
    schema = json.loads(event["input_schema"])
    assert list(schema["properties"]) == ["text", "n", "sep"]
    assert schema["required"] == ["text"]
    assert process.wait() == 12
