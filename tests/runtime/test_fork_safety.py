"""A template whose imports initialise CUDA says so and forks nothing; the same
snapshot still restores in a fresh interpreter (the path the agent takes for it).

The fixture (tests/fixtures/bundles/cuda_at_import) queries CuPy or torch at import;
without a GPU it installs fakes that keep the state a real query leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import (
    Client,
    Processes,
    Snapshot,
    build,
    send_spawn,
    start_restore,
    start_template,
)

BUNDLE = "cuda_at_import"
TORCH_HANDLER = "torch_app:TorchAtImport"


@pytest.fixture(scope="module")
def snapshot(module_processes: Processes, tmp_path_factory: pytest.TempPathFactory
             ) -> Snapshot:
    return build(module_processes, BUNDLE, tmp_path_factory.mktemp("cuda_at_import") / "s")


def test_a_template_that_initialised_cuda_reports_it_and_refuses_to_fork(
    snapshot: Snapshot, processes: Processes
) -> None:
    template = start_template(processes, snapshot)
    assert template.ready["fork_safe"] is False
    assert template.ready["unsafe_reason"] == "CuPy initialised CUDA at import (module app)"
    socket_path = processes.socket_path("instance")
    request = snapshot.spawn_request(socket_path, processes.log_dir / "refused.log")
    open_fds = len(os.listdir(f"/proc/{template.process.pid}/fd"))
    for _ in range(2):  # every request, and the template keeps answering
        events = send_spawn(template.control, request)
        assert len(events) == 1, events
        assert events[0]["event"] == "failed" and events[0]["stage"] == "spawn"
        assert "not fork-safe: CuPy initialised CUDA at import (module app)" in (
            events[0]["reason"])
    assert not Path(socket_path).exists()  # nothing was forked to serve on it
    # The descriptors each request carried were closed, not kept.
    assert len(os.listdir(f"/proc/{template.process.pid}/fd")) == open_fds
    assert template.process.popen.poll() is None
    assert "not forking instances" in template.process.log()


def test_its_snapshot_restores_in_a_fresh_interpreter(snapshot: Snapshot,
                                                      processes: Processes) -> None:
    socket_path = processes.socket_path("restored")
    process, events = start_restore(processes, snapshot, socket_path)
    assert [e["event"] for e in events][-1] == "ready", (events, process.describe())
    assert events[-1]["pid"] == process.pid  # restored in itself, not in a fork
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
    template = start_template(processes, Snapshot(BUNDLE, out, captured),
                              handler=TORCH_HANDLER)
    assert template.ready["fork_safe"] is False
    assert template.ready["unsafe_reason"] == (
        "torch initialised CUDA at import (module torch_app)")


def test_a_template_that_only_imports_stays_fork_safe(
    module_processes: Processes, processes: Processes, tmp_path: Path
) -> None:
    template = start_template(processes, build(module_processes, "counter_rt",
                                               tmp_path / "counter"))
    assert template.ready["fork_safe"] is True and template.ready["unsafe_reason"] == ""
    instance = template.spawn(processes)
    assert instance.pid != template.process.pid  # it still forks
