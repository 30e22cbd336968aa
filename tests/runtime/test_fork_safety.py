"""A template whose imports initialise CUDA says so and forks nothing; the same
snapshot still restores in a fresh interpreter (the path the agent takes for it).

The fixture (tests/fixtures/bundles/cuda_at_import) queries CuPy or torch at import;
without a GPU it installs fakes that keep the state a real query leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import (
    Client,
    Processes,
    Snapshot,
    TemplateHandle,
    build,
    wait_ready,
)

BUNDLE = "cuda_at_import"
TORCH_HANDLER = "torch_app:TorchAtImport"


def start_unsafe_template(processes: Processes, snapshot: Snapshot,
                          handler: str | None = None) -> tuple[TemplateHandle, dict[str, object]]:
    control = processes.socket_path("control")
    process = processes.start("template", snapshot.bundle, "--snapshot-json",
                              snapshot.snapshot_json, "--control", control, handler=handler)
    event = process.event()
    assert event["event"] == "template_ready", (event, process.describe())
    return TemplateHandle(process, control, snapshot, processes), event


@pytest.fixture(scope="module")
def snapshot(module_processes: Processes, tmp_path_factory: pytest.TempPathFactory
             ) -> Snapshot:
    return build(module_processes, BUNDLE, tmp_path_factory.mktemp("cuda_at_import") / "s")


def test_a_template_that_initialised_cuda_reports_it_and_refuses_to_fork(
    snapshot: Snapshot, processes: Processes
) -> None:
    template, ready = start_unsafe_template(processes, snapshot)
    assert ready["fork_safe"] is False
    assert ready["unsafe_reason"] == "CuPy initialised CUDA at import (module app)"
    socket_path = processes.socket_path("instance")
    request = snapshot.spawn_request(socket_path, processes.log_dir / "refused.log")
    for _ in range(2):  # every request, and the template keeps answering
        events = template.request(json.dumps(request).encode() + b"\n")
        assert len(events) == 1, events
        assert events[0]["event"] == "failed" and events[0]["stage"] == "spawn"
        assert "not fork-safe: CuPy initialised CUDA at import (module app)" in (
            events[0]["reason"])
    assert not Path(socket_path).exists()  # nothing was forked to serve on it
    assert template.process.popen.poll() is None
    assert "not forking instances" in template.process.log()


def test_its_snapshot_restores_in_a_fresh_interpreter(snapshot: Snapshot,
                                                      processes: Processes) -> None:
    socket_path = processes.socket_path("restored")
    process = processes.start("restore", BUNDLE, *snapshot.restore_args(socket_path))
    ready = wait_ready(process)
    assert ready["pid"] == process.pid
    client = Client(socket_path)
    try:
        response = client.invoke({})
    finally:
        client.close()
    assert response.status == 200, response.body
    assert response.json()["answer"] == 42  # set by setup() in the build, not re-run


def test_torch_initialising_cuda_at_import_is_named(
    module_processes: Processes, processes: Processes, tmp_path: Path
) -> None:
    out = tmp_path / "torch"
    started = module_processes.start("build", BUNDLE, "--out", str(out), handler=TORCH_HANDLER)
    captured = started.event()
    assert captured["event"] == "captured", (captured, started.describe())
    torch_snapshot = Snapshot(BUNDLE, out, captured)
    _, ready = start_unsafe_template(processes, torch_snapshot, handler=TORCH_HANDLER)
    assert ready["fork_safe"] is False
    assert ready["unsafe_reason"] == "torch initialised CUDA at import (module torch_app)"


def test_a_template_that_only_imports_stays_fork_safe(
    module_processes: Processes, processes: Processes, tmp_path: Path
) -> None:
    plain = build(module_processes, "counter_rt", tmp_path / "counter")
    control = processes.socket_path("control")
    process = processes.start("template", "counter_rt", "--snapshot-json",
                              plain.snapshot_json, "--control", control)
    ready = process.event()
    assert ready["event"] == "template_ready"
    assert ready["fork_safe"] is True and ready["unsafe_reason"] == ""
    instance = TemplateHandle(process, control, plain, processes).spawn(processes)
    assert instance.pid != process.pid  # it still forks
