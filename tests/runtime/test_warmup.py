"""A build's warm-up (snapshotter/runtime/warmup.py): `warmup(self)` and thaw.toml's
`[snapshot] warmup` input run after setup() and before the capture, so what they did is
in the snapshot, and the modules they imported are among the template's pre-imports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from thaw.snapshotter.runtime.warmup import WarmupConfigError, warmup_input

from .conftest import Processes, TemplateHandle, build, start_template


def test_warmup_state_and_lazy_imports_survive_a_restore(
    processes: Processes, tmp_path: Path
) -> None:
    snapshot = build(processes, "warmup_rt", tmp_path / "snapshot")
    assert "warmup" in snapshot.captured["timings"]
    # The module warmup() imported joins the recorded pre-imports.
    assert "lazy_helper" in snapshot.meta["modules"]
    template = start_template(processes, snapshot)
    instance = template.spawn(processes)
    client = instance.client()
    try:
        reply = client.invoke({"text": "first"})
        assert reply.status == 200, reply.body
        body = reply.json()
    finally:
        client.close()
    # State warmup() set, the module already loaded (the template imported it), and
    # the thaw.toml warm-up input reached predict() before the capture.
    assert body == {"warmed": "from-warmup", "lazy_loaded": True,
                    "seen": [["warm", 2], ["first", 1]]}


def test_a_raising_warmup_fails_the_build_at_stage_warmup(
    processes: Processes, tmp_path: Path
) -> None:
    out = tmp_path / "snapshot"
    process = processes.start("build", "warmup_rt", "--out", str(out),
                              env={"WARMUP_RAISES": "1"})
    event = process.event()
    assert event["event"] == "failed" and event["stage"] == "warmup", event
    assert "warm-up refused on purpose" in event["reason"]
    assert process.wait() == 16
    assert not (out / "snapshot.json").exists()


def test_warmup_input_is_read_from_the_bundle(tmp_path: Path) -> None:
    assert warmup_input(tmp_path) is None
    (tmp_path / "thaw.toml").write_text('name = "x"\nhandler = "a:B"\n')
    assert warmup_input(tmp_path) is None
    (tmp_path / "thaw.toml").write_text('[snapshot]\nwarmup = { texts = ["a", "b"] }\n')
    assert warmup_input(tmp_path) == {"texts": ["a", "b"]}
    (tmp_path / "thaw.toml").write_text('[snapshot]\nwarmup = "go"\n')
    with pytest.raises(WarmupConfigError, match="snapshot.warmup must be a table"):
        warmup_input(tmp_path)


def _template_build(template: TemplateHandle, out: Path, env: dict[str, str]
                    ) -> list[dict[str, Any]]:
    line = {"op": "build", "out": str(out), "log": str(out.parent / f"{out.name}.log"),
            "env": env}
    return template.request(json.dumps(line).encode() + b"\n")


def test_a_template_build_runs_the_warmup_too(processes: Processes, tmp_path: Path) -> None:
    """The agent builds new versions in a child of the function's template: the same
    warm-up runs there, and fails the same way."""
    template = start_template(processes, build(processes, "warmup_rt", tmp_path / "first"))
    events = _template_build(template, tmp_path / "second", {})
    assert events[-1]["event"] == "captured", events
    assert "warmup" in events[-1]["timings"]
    meta = json.loads((tmp_path / "second" / "snapshot.json").read_text())
    assert "lazy_helper" in meta["modules"]
    events = _template_build(template, tmp_path / "third", {"WARMUP_RAISES": "1"})
    assert events[-1]["event"] == "failed" and events[-1]["stage"] == "warmup", events
    assert "warm-up refused on purpose" in events[-1]["reason"]
    assert not (tmp_path / "third" / "snapshot.json").exists()
