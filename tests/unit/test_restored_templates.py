"""The agent's restored templates (platform/restored.py) with a fake runtime: one per
snapshot, started by its first restore and forked from by every later one; anything
that keeps it from serving a start answers None (the agent restores from the template)
and is remembered until the snapshot's last instance ends; it stops with that instance,
with its snapshot's collection, and is forgotten when its process dies. And the stages a
start reports add up to its time whichever way it went."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from thaw.core.errors import InstanceFailed, SnapshotError
from thaw.platform.restored import (
    RestoredState,
    RestoredTemplate,
    RestoredTemplates,
    ready_prefault,
    start_stages,
)
from thaw.platform.runtime import Exited, InstanceHandle, SpawnRequest
from thaw.snapshotter.runtime.restored_template import (
    RESTORED_TEMPLATE_ROLE,
    RESTORED_TEMPLATE_ROLE_ENV,
    is_restored_template_request,
)

TEMPLATE = "/run/t.sock"
RT_PID = 700


class FakeRuntime:
    """Answers spawns on the template's socket with a restored template (pid 700) and
    on any other socket with an instance (pids from 1000)."""

    name = "process"

    def __init__(self) -> None:
        self.spawns: list[tuple[str, SpawnRequest]] = []
        self.stopped: list[int] = []
        self.fail_start: BaseException | None = None
        self.fail_fork: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self._next = 1000

    async def spawn(self, control: str, request: SpawnRequest,
                    timeout: float) -> tuple[int, dict[str, Any]]:
        self.spawns.append((control, request))
        if control == TEMPLATE:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_start is not None:
                raise self.fail_start
            return RT_PID, {"event": "ready", "pid": RT_PID}
        if self.fail_fork is not None:
            raise self.fail_fork
        self._next += 1
        return self._next, {"event": "ready", "pid": self._next,
                            "timings": {"prefault": 0.25, "on_restore": 0.0}}

    async def stop(self, handle: InstanceHandle, reason: str) -> None:
        self.stopped.append(handle.pid)


class Exits:
    """Process ends the test decides (the restored templates' watcher waits on them)."""

    def __init__(self) -> None:
        self.events: dict[int, asyncio.Event] = {}

    def event(self, pid: int) -> asyncio.Event:
        return self.events.setdefault(pid, asyncio.Event())

    async def wait(self, pid: int) -> None:
        await self.event(pid).wait()


def request(instance: str) -> SpawnRequest:
    return SpawnRequest(instance_id=instance, socket=f"/run/{instance}.sock",
                        log=f"/logs/{instance}.log",
                        fds={"snapshot_json": 10, "pickle": 11, "host_arena": 12,
                             "slice": 13},
                        env={"GREETING": "hi"}, secrets={"TOKEN": "s"})


def make(tmp_path: Path, runtime: FakeRuntime, exits: Exits | None = None,
         enabled: bool = True) -> tuple[RestoredTemplates, list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []

    def spawn_task(coro: Coroutine[Any, Any, None]) -> None:
        tasks.append(asyncio.create_task(coro))

    async def exit_status(pid: int) -> Exited | None:
        return Exited("killed by SIGKILL", -9)

    def places(tenant: str, snapshot: str) -> tuple[str, str]:
        return str(tmp_path / f"rt-{snapshot}.sock"), str(tmp_path / f"rt-{snapshot}.log")

    pool = RestoredTemplates(runtime=runtime, places=places,  # type: ignore[arg-type]
                             start_timeout=5.0, spawn_task=spawn_task,
                             exit_status=exit_status, enabled=enabled,
                             wait_exit=(exits or Exits()).wait)
    return pool, tasks


async def fork(pool: RestoredTemplates, instance: str, snapshot: str = "snap",
               device_size: int = 0) -> Any:
    pool.hold(instance, snapshot)
    return await pool.spawn(snapshot=snapshot, tenant="dev", template_control=TEMPLATE,
                            request=request(instance), device_size=device_size)


async def test_first_restore_starts_it_and_every_instance_forks_from_it(tmp_path: Path
                                                                        ) -> None:
    runtime = FakeRuntime()
    pool, _ = make(tmp_path, runtime)
    first = await fork(pool, "i1")
    second = await fork(pool, "i2")
    assert (first.pid, second.pid) == (1001, 1002)
    assert second.restore_seconds == 0.0
    assert ready_prefault(second.ready) == 0.25
    controls = [control for control, _ in runtime.spawns]
    rt_control = str(tmp_path / "rt-snap.sock")
    assert controls == [TEMPLATE, rt_control, rt_control]
    started = runtime.spawns[0][1]
    # The restored template gets the snapshot's descriptors, none of an instance's own.
    assert is_restored_template_request(started)
    assert started.env == {RESTORED_TEMPLATE_ROLE_ENV: RESTORED_TEMPLATE_ROLE}
    assert started.socket == rt_control and started.secrets == {}
    assert set(started.fds) == {"snapshot_json", "pickle", "host_arena"}
    # Each instance is asked for with its own request, as from the template.
    assert runtime.spawns[1][1] == request("i1") and runtime.spawns[2][1] == request("i2")
    assert pool.pids() == {"snap": RT_PID}


async def test_concurrent_first_restores_start_one(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    runtime.gate = asyncio.Event()
    pool, _ = make(tmp_path, runtime)
    starts = [asyncio.ensure_future(fork(pool, f"i{n}")) for n in range(3)]
    await asyncio.sleep(0.01)
    runtime.gate.set()
    forked = await asyncio.gather(*starts)
    assert sorted(f.pid for f in forked) == [1001, 1002, 1003]
    assert [control for control, _ in runtime.spawns].count(TEMPLATE) == 1


@pytest.mark.parametrize("case", ["disabled", "device arena", "docker runtime"])
async def test_none_where_it_does_not_apply(tmp_path: Path, case: str) -> None:
    runtime = FakeRuntime()
    if case == "docker runtime":
        runtime.name = "docker"
    pool, _ = make(tmp_path, runtime, enabled=case != "disabled")
    assert await fork(pool, "i1", device_size=4096 if case == "device arena" else 0) is None
    assert runtime.spawns == []


async def test_a_failed_start_is_remembered_until_the_last_instance_ends(tmp_path: Path
                                                                         ) -> None:
    runtime = FakeRuntime()
    runtime.fail_start = SnapshotError("restore failed: boom")
    pool, _ = make(tmp_path, runtime)
    assert await fork(pool, "i1") is None
    assert "boom" in pool.refused["snap"]
    assert await fork(pool, "i2") is None
    assert len(runtime.spawns) == 1  # not tried again
    await pool.release("i1")
    assert "snap" in pool.refused
    await pool.release("i2")
    assert pool.refused == {}
    runtime.fail_start = None
    assert (await fork(pool, "i3")).pid == 1001


async def test_a_failed_fork_stops_it_and_later_starts_restore(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    pool, _ = make(tmp_path, runtime)
    await fork(pool, "i1")
    runtime.fail_fork = InstanceFailed("template is not reachable: refused")
    assert await fork(pool, "i2") is None
    assert runtime.stopped == [RT_PID]
    assert pool.pids() == {}
    runtime.fail_fork = None
    assert await fork(pool, "i3") is None


async def test_its_death_is_noticed(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    exits = Exits()
    pool, tasks = make(tmp_path, runtime, exits)
    await fork(pool, "i1")
    exits.event(RT_PID).set()
    await asyncio.gather(*tasks)
    assert pool.pids() == {}
    assert "SIGKILL" in pool.refused["snap"]
    assert runtime.stopped == []  # nothing left to stop; its instances go on
    assert await fork(pool, "i2") is None
    assert [control for control, _ in runtime.spawns].count(TEMPLATE) == 1


async def test_it_stops_with_the_last_instance_of_its_snapshot(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    pool, _ = make(tmp_path, runtime)
    await fork(pool, "i1")
    await fork(pool, "i2")
    await fork(pool, "j1", snapshot="other")
    await pool.release("i1")
    assert runtime.stopped == []
    await pool.release("i2")
    assert runtime.stopped == [RT_PID]
    assert set(pool.pids()) == {"other"}


async def test_it_lingers_after_the_last_instance_and_a_new_one_forks_from_it(
        tmp_path: Path) -> None:
    runtime = FakeRuntime()
    pool, tasks = make(tmp_path, runtime)
    pool.linger = 0.05
    await fork(pool, "i1")
    await pool.release("i1")
    assert runtime.stopped == [] and pool.pids() == {"snap": RT_PID}
    # A cold start within the linger forks from it, restoring nothing...
    again = await fork(pool, "i2")
    assert again.restore_seconds == 0.0
    assert [control for control, _ in runtime.spawns].count(TEMPLATE) == 1
    await asyncio.sleep(0.1)
    assert runtime.stopped == []  # ...and held, it is not stopped by the earlier timer
    await pool.release("i2")
    for _ in range(100):  # the timer's stop runs as a task of its own
        if runtime.stopped:
            break
        await asyncio.sleep(0.02)
    assert runtime.stopped == [RT_PID] and pool.pids() == {}
    assert len(tasks) == 2  # its watcher, and the one stop the second timer made


async def test_it_stops_at_once_when_memory_is_low(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    pool, _ = make(tmp_path, runtime)
    pool.linger = 60.0
    pool.memory_low = lambda: True
    await fork(pool, "i1")
    await pool.release("i1")
    assert runtime.stopped == [RT_PID]


async def test_a_lingering_one_is_collected_without_waiting(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    pool, tasks = make(tmp_path, runtime)
    pool.linger = 60.0
    await fork(pool, "i1", snapshot="a")
    await pool.release("i1")
    await pool.collect(set())
    assert runtime.stopped == [RT_PID] and pool.pids() == {}
    await asyncio.sleep(0)
    assert len(tasks) == 1  # only its watcher: its timer went with it, unfired


async def test_collection_stops_the_snapshots_not_kept(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    pool, _ = make(tmp_path, runtime)
    await fork(pool, "i1", snapshot="a")
    await fork(pool, "j1", snapshot="b")
    await pool.collect({"b"})
    assert set(pool.pids()) == {"b"}
    assert len(runtime.stopped) == 1


async def test_stopped_while_starting_ends_when_its_pid_is_known(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    runtime.gate = asyncio.Event()
    pool, _ = make(tmp_path, runtime)
    start = asyncio.ensure_future(fork(pool, "i1"))
    await asyncio.sleep(0.01)
    await pool.stop("snap", "collected")
    runtime.gate.set()
    assert await start is None
    assert runtime.stopped == [RT_PID]


def test_state_moves() -> None:
    rt = RestoredTemplate("snap", "/run/rt.sock")
    rt.move(RestoredState.RUNNING)
    rt.move(RestoredState.STOPPED)
    with pytest.raises(ValueError, match="not a legal move"):
        rt.move(RestoredState.RUNNING)


@pytest.mark.parametrize("forked", [None, 0.0, 0.3, 5.0])
def test_start_stages_add_up(forked: float | None) -> None:
    stages = start_stages(1.0, 0.2, forked)
    assert sum(seconds for _, seconds in stages) == pytest.approx(1.0)
    names = [name for name, _ in stages]
    assert names == (["restore", "prefault"] if forked is None
                     else ["restore", "fork", "prefault"])
    if forked is not None:
        assert dict(stages)["restore"] == pytest.approx(min(forked, 0.8))
