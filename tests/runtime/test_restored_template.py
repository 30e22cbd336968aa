"""A restored template, run by a real template: it restores the snapshot once and forks
instances that run only their own part (on_restore) and are the template's children
(it reports their exits), so killing it ends none of them; it refuses requests for
another snapshot, and snapshots with a device arena."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from thaw.snapshotter.runtime.restored_template import (
    RESTORED_TEMPLATE_COMM,
    RESTORED_TEMPLATE_ROLE,
    RESTORED_TEMPLATE_ROLE_ENV,
)

from .conftest import (
    Client,
    Processes,
    Snapshot,
    TemplateHandle,
    kill_pid,
    send_spawn,
    start_build,
    start_template,
)


@pytest.fixture(scope="module")
def snapshots(module_processes: Processes, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Snapshot]:
    out = tmp_path_factory.mktemp("snapshots")
    builds = [start_build(module_processes, name, out / name)
              for name in ("on_restore_rt", "counter_rt", "numpy_rt", "random_rt")]
    return {started.bundle: started.snapshot() for started in builds}


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _restored_template(template: TemplateHandle, processes: Processes,
                       snapshot: Snapshot | None = None) -> tuple[str, list[dict[str, Any]]]:
    control = processes.socket_path("rt")
    record = (snapshot or template.snapshot).spawn_request(
        control, processes.log_dir / "restored-template.log")
    record["env"] = {RESTORED_TEMPLATE_ROLE_ENV: RESTORED_TEMPLATE_ROLE}
    events = send_spawn(template.control, record)
    if events and events[0]["event"] == "spawned":
        processes.track(events[0]["pid"])
    return control, events


def _fork(control: str, processes: Processes, snapshot: Snapshot) -> list[dict[str, Any]]:
    socket_path = processes.socket_path("instance")
    record = snapshot.spawn_request(socket_path,
                                    processes.log_dir / f"{Path(socket_path).stem}.log")
    events = send_spawn(control, record)
    if events and events[0]["event"] == "spawned":
        processes.track(events[0]["pid"])
        events[-1]["socket"] = socket_path
    return events


def _call(socket_path: str) -> Any:
    client = Client(socket_path)
    try:
        response = client.invoke({})
        assert response.status == 200, response.body
        return response.json()
    finally:
        client.close()


def test_instances_fork_from_it_and_are_the_templates_children(
        snapshots: dict[str, Snapshot], processes: Processes) -> None:
    template = start_template(processes, snapshots["on_restore_rt"])
    control, events = _restored_template(template, processes)
    assert [e["event"] for e in events] == ["spawned", "ready"], events
    rt = events[0]["pid"]
    assert _comm(rt) == RESTORED_TEMPLATE_COMM
    assert "unpickle" in events[1]["timings"] and "on_restore" not in events[1]["timings"]

    instances = []
    for _ in range(2):
        answer = _fork(control, processes, template.snapshot)
        assert [e["event"] for e in answer] == ["spawned", "ready"], answer
        assert answer[0]["pid"] == answer[1]["pid"]
        instances.append(answer[1])
    for ready in instances:
        pid = ready["pid"]
        assert pid != rt and _parent(pid) == template.process.pid
        assert _comm(pid) != RESTORED_TEMPLATE_COMM
        state = _call(ready["socket"])
        # Restored once, elsewhere: only on_restore ran here, once.
        assert state["pid"] == pid and state["restores"] == 1 and state["restored_in"] == pid

    # Killed, the restored template ends none of its instances.
    kill_pid(rt)
    assert template.process.event() == {"event": "child_exited", "pid": rt,
                                        "returncode": -9}
    for ready in instances:
        assert _call(ready["socket"])["pid"] == ready["pid"]
    # Their exits reach the template's status channel, as its own forks' do.
    kill_pid(instances[0]["pid"])
    assert template.process.event() == {"event": "child_exited",
                                        "pid": instances[0]["pid"], "returncode": -9}


def test_each_instance_faults_the_host_arena_in_and_the_template_does_not(
        snapshots: dict[str, Snapshot], processes: Processes) -> None:
    """fork copies no page table of a mapping never written, so a prefault in the
    restored template would be lost on its instances: only they prefault."""
    template = start_template(processes, snapshots["numpy_rt"])
    assert template.snapshot.folder.joinpath("host.arena").stat().st_size > 0
    control, events = _restored_template(template, processes)
    assert [e["event"] for e in events] == ["spawned", "ready"], events
    assert "unpickle" in events[1]["timings"] and "prefault" not in events[1]["timings"]
    answer = _fork(control, processes, template.snapshot)
    assert [e["event"] for e in answer] == ["spawned", "ready"], answer
    assert "prefault" in answer[1]["timings"]


def test_instances_forked_from_it_draw_their_own_random_numbers(
        snapshots: dict[str, Snapshot], processes: Processes) -> None:
    """It seeds once (to warm torch's seeding caches), and each instance reseeds after
    the fork: no two instances, nor an instance and the build, replay one draw."""
    template = start_template(processes, snapshots["random_rt"])
    control, events = _restored_template(template, processes)
    assert [e["event"] for e in events] == ["spawned", "ready"], events
    draws = []
    for _ in range(3):
        answer = _fork(control, processes, template.snapshot)
        assert [e["event"] for e in answer] == ["spawned", "ready"], answer
        draws.append(_call(answer[1]["socket"]))
    for generator in ("random", "numpy", "torch", "uuid"):
        assert len({draw[generator] for draw in draws}) == 3, (generator, draws)


def test_it_refuses_another_snapshot(snapshots: dict[str, Snapshot],
                                     processes: Processes) -> None:
    template = start_template(processes, snapshots["on_restore_rt"])
    control, events = _restored_template(template, processes)
    assert events[-1]["event"] == "ready", events
    refused = _fork(control, processes, snapshots["counter_rt"])
    assert len(refused) == 1 and refused[0]["event"] == "failed", refused
    assert refused[0]["stage"] == "spawn" and "another snapshot" in refused[0]["reason"]
    # It goes on forking its own snapshot.
    assert _fork(control, processes, template.snapshot)[-1]["event"] == "ready"


def test_it_refuses_a_snapshot_with_a_device_arena(
        snapshots: dict[str, Snapshot], processes: Processes, tmp_path: Path) -> None:
    # The same snapshot, claiming a device arena: its storages would be views into one
    # instance's slice, which no fork can share.
    folder = tmp_path / "with-device"
    shutil.copytree(snapshots["on_restore_rt"].folder, folder)
    meta = json.loads((folder / "snapshot.json").read_text())
    meta["device_size"] = 4096
    (folder / "snapshot.json").write_text(json.dumps(meta))
    claimed = Snapshot(snapshots["on_restore_rt"].bundle, folder,
                       snapshots["on_restore_rt"].captured)
    template = start_template(processes, snapshots["on_restore_rt"])
    _control, events = _restored_template(template, processes, claimed)
    assert events[-1]["event"] == "failed" and "device arena" in events[-1]["reason"], events
