"""Idle templates are stopped least recently used first when the node's templates hold
more than their memory budget or the node's available memory is low; never one with a
running instance, one just used, or one the pool was just asked for; a later ensure
starts it again. Zygotes are used where configured, and a template whose zygote cannot
fork it is launched instead (platform/template_eviction.py, platform/templates.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.unit.test_template_fork_safety import (
    FakeRuntime,
    FakeTemplate,
    materialized,
    safe_ready,
)
from thaw.core.errors import InstanceFailed
from thaw.platform.sandbox.areas import TenantArea, TenantAreas
from thaw.platform.template_eviction import (
    EvictionPolicy,
    TemplateMemory,
    TemplateUse,
    choose_evictions,
)
from thaw.platform.templates import TemplatePool
from thaw.platform.zygotes import ZygotePool, zygote_modules
from thaw.proto import agent_pb2, manifest_pb2

MiB = 1 << 20
BUDGET = EvictionPolicy(budget_bytes=100 * MiB, idle_seconds=30.0)


def use(key: str, last_used: float, *, idle: bool = True, mb: int = 60) -> TemplateUse:
    return TemplateUse(key, last_used, idle, mb * MiB)


def test_over_budget_the_least_recently_used_idle_templates_go_first() -> None:
    uses = [use("new", 90.0), use("old", 10.0), use("middle", 50.0)]
    chosen = choose_evictions(uses, BUDGET, available=1 << 40, now=200.0)
    # 180 MiB over a 100 MiB budget: the two oldest leave 60 MiB.
    assert [key for key, _ in chosen] == ["old", "middle"]
    assert {why for _, why in chosen} == {"templates over their memory budget"}


def test_busy_and_recently_used_templates_stay_whatever_the_budget() -> None:
    uses = [use("busy", 0.0, idle=False, mb=500), use("recent", 190.0, mb=500)]
    assert choose_evictions(uses, BUDGET, available=1 << 40, now=200.0) == []


def test_low_available_memory_evicts_until_the_floor_is_met() -> None:
    policy = EvictionPolicy(min_available_bytes=1000 * MiB, idle_seconds=0.0)
    uses = [use("a", 1.0, mb=300), use("b", 2.0, mb=300), use("c", 3.0, mb=300)]
    chosen = choose_evictions(uses, policy, available=500 * MiB, now=10.0)
    assert chosen == [("a", "node memory low"), ("b", "node memory low")]


def test_no_budget_and_no_floor_evicts_nothing() -> None:
    policy = EvictionPolicy()
    assert not policy.active
    assert choose_evictions([use("a", 0.0, mb=10_000)], policy, 0, 1e9) == []


def test_a_zygote_imports_the_environment_never_the_bundles_own_code(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("")
    (tmp_path / "helpers").mkdir()
    modules = ["app", "numpy", "numpy.linalg", "helpers.text", "json", "numpy"]
    assert zygote_modules(modules, tmp_path) == ["numpy", "numpy.linalg", "json"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spec(name: str, digest: str) -> agent_pb2.FunctionSpec:
    return agent_pb2.FunctionSpec(tenant="acme", name=name, version="1", handler="app:Fn",
                                  bundle_digest=digest)


@pytest.fixture
def bundles(tmp_path: Path) -> dict[str, Path]:
    found = {}
    for digest in ("d1", "d2", "d3"):
        folder = tmp_path / "bundles" / digest
        folder.mkdir(parents=True)
        (folder / "app.py").write_text(f"class Fn: ...  # {digest}\n")
        found[digest] = folder
    return found


def pool_with(runtime: FakeRuntime, bundles: dict[str, Path], tmp_path: Path, *,
              policy: EvictionPolicy, clock: Clock, idle: set[int] | None = None,
              zygotes: ZygotePool | None = None,
              measured: list[int] | None = None) -> TemplatePool:
    tasks: list[asyncio.Task[None]] = []

    async def ensure_bundle(digest: str) -> Path:
        return bundles[digest]

    def spawn_task(coro: Coroutine[Any, Any, None]) -> None:
        tasks.append(asyncio.ensure_future(coro))

    def measure(pid: int) -> TemplateMemory:
        if measured is not None:
            measured.append(pid)
        return TemplateMemory(idle is None or pid in idle, 80 * MiB)

    areas = TenantAreas(home=tmp_path, run_dir=tmp_path, uid_range=(200000, 200009),
                        owned=False)
    return TemplatePool(runtime=runtime, areas=areas,  # type: ignore[arg-type]
                        start_timeout=5.0, ensure_bundle=ensure_bundle,
                        spawn_task=spawn_task, zygotes=zygotes, eviction=policy,
                        clock=clock, measure=measure, available=lambda: 1 << 40)


MANIFEST = manifest_pb2.SnapshotManifest(modules=["app", "json"])


async def test_an_evicted_template_is_started_again_by_the_next_ensure(
        bundles: dict[str, Path], tmp_path: Path) -> None:
    runtime = FakeRuntime(safe_ready())
    clock = Clock()
    pool = pool_with(runtime, bundles, tmp_path, clock=clock,
                     policy=EvictionPolicy(budget_bytes=100 * MiB, idle_seconds=30.0))
    first = await pool.ensure(spec("one", "d1"), MANIFEST, materialized("s1"))
    clock.now += 60.0
    with capture_logs() as logs:
        # Two templates of 80 MiB are over 100 MiB: the one unused for a minute goes,
        # never the one just asked for.
        second = await pool.ensure(spec("two", "d2"), MANIFEST, materialized("s2"))
    assert runtime.launched[0][1].killed
    assert not runtime.launched[1][1].killed
    assert pool.evicted == [first.key]
    assert second.key in pool.templates and first.key not in pool.templates
    evicted = [e for e in logs if e["event"] == "template evicted"]
    assert evicted and evicted[0]["template"] == first.key

    again = await pool.ensure(spec("one", "d1"), MANIFEST, materialized("s1"))
    assert again.key == first.key and again.running
    assert len(runtime.launched) == 3


async def test_a_template_with_a_running_instance_is_never_evicted(
        bundles: dict[str, Path], tmp_path: Path) -> None:
    runtime = FakeRuntime(safe_ready())
    clock = Clock()
    pool = pool_with(runtime, bundles, tmp_path, clock=clock, idle=set(),
                     policy=EvictionPolicy(budget_bytes=1, idle_seconds=1.0))
    await pool.ensure(spec("one", "d1"), MANIFEST, materialized("s1"))
    clock.now += 3600.0
    await pool.ensure(spec("two", "d2"), MANIFEST, materialized("s2"))
    assert await pool.evict() == []
    assert not any(template.killed for _, template in runtime.launched)


class RefusingZygotes(ZygotePool):
    """A zygote pool whose every fork fails as a zygote that could not start does."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def fork_template(self, launch: Any, area: TenantArea,
                            modules: Any, import_env: Any = None) -> None:
        self.asked.append(launch.bundle)
        return None


async def test_a_template_its_zygote_cannot_fork_is_launched(
        bundles: dict[str, Path], tmp_path: Path) -> None:
    runtime = FakeRuntime(safe_ready())
    zygotes = RefusingZygotes()
    pool = pool_with(runtime, bundles, tmp_path, clock=Clock(), policy=EvictionPolicy(),
                     zygotes=zygotes)
    template = await pool.ensure(spec("one", "d3"), MANIFEST, materialized("s3"))
    assert zygotes.asked == [str(bundles["d3"])]
    assert template.running and template.zygote == ""
    assert len(runtime.launched) == 1


class FailingForkedTemplate:
    """A template a zygote forked that dies before it is ready."""

    zygote = "z1"

    def __init__(self) -> None:
        self.killed = False

    async def next_event(self, timeout: float) -> dict[str, Any]:
        raise InstanceFailed("template exited (exit code 3) before it was ready")

    async def kill(self) -> None:
        self.killed = True


class FailingZygotes(ZygotePool):
    def __init__(self) -> None:
        self.forked: list[FailingForkedTemplate] = []

    async def fork_template(self, launch: Any, area: TenantArea,
                            modules: Any, import_env: Any = None) -> Any:
        self.forked.append(FailingForkedTemplate())
        return self.forked[-1]


async def test_a_forked_template_that_fails_is_launched_instead(
        bundles: dict[str, Path], tmp_path: Path) -> None:
    runtime = FakeRuntime(safe_ready())
    zygotes = FailingZygotes()
    pool = pool_with(runtime, bundles, tmp_path, clock=Clock(), policy=EvictionPolicy(),
                     zygotes=zygotes)
    with capture_logs() as logs:
        template = await pool.ensure(spec("one", "d1"), MANIFEST, materialized("s1"))
    assert zygotes.forked and zygotes.forked[0].killed
    assert template.running and template.zygote == "" and len(runtime.launched) == 1
    assert any(e["event"].startswith("template forked from a zygote failed") for e in logs)


async def test_with_no_budget_and_memory_to_spare_no_template_is_measured(
        bundles: dict[str, Path], tmp_path: Path) -> None:
    runtime = FakeRuntime(safe_ready())
    clock = Clock()
    measured: list[int] = []
    pool = pool_with(runtime, bundles, tmp_path, clock=clock, measured=measured,
                     policy=EvictionPolicy(min_available_bytes=1 * MiB, idle_seconds=1.0))
    await pool.ensure(spec("one", "d1"), MANIFEST, materialized("s1"))
    clock.now += 60.0
    assert await pool.evict() == [] and measured == []


class ReadyForkedTemplate(FakeTemplate):
    zygote = "z2"


class ImportEnvZygotes(ZygotePool):
    """A zygote whose forked template fails because the function's code set a variable
    at import, unless the zygote imported with it set."""

    def __init__(self) -> None:
        self.asked: list[dict[str, str] | None] = []
        self.zygotes = {}

    async def fork_template(self, launch: Any, area: TenantArea,
                            modules: Any, import_env: Any = None) -> Any:
        self.asked.append(import_env)
        if import_env == {"OMP_NUM_THREADS": "1"}:
            return ReadyForkedTemplate(safe_ready())
        failing = FailingForkedTemplate()

        async def said(timeout: float) -> dict[str, Any]:
            raise InstanceFailed("template failed: ImportEnvChanged: "
                                 'thaw-import-env:{"OMP_NUM_THREADS": "1"}')

        failing.next_event = said  # type: ignore[method-assign]
        return failing


async def test_a_function_that_sets_the_environment_at_import_forks_from_a_zygote_with_it(
        bundles: dict[str, Path], tmp_path: Path) -> None:
    runtime = FakeRuntime(safe_ready())
    zygotes = ImportEnvZygotes()
    pool = pool_with(runtime, bundles, tmp_path, clock=Clock(), policy=EvictionPolicy(),
                     zygotes=zygotes)
    with capture_logs() as logs:
        template = await pool.ensure(spec("one", "d1"), MANIFEST, materialized("s1"))
    assert zygotes.asked == [{}, {"OMP_NUM_THREADS": "1"}]
    assert template.running and template.zygote == "z2" and runtime.launched == []
    told = [e for e in logs if e["event"].startswith("the function's import sets environment")]
    assert told and told[0]["variables"] == ["OMP_NUM_THREADS"]
    assert '"1"' not in repr(told)  # names only, never values


async def test_the_next_function_of_the_confinement_first_tries_what_the_last_one_set(
        bundles: dict[str, Path], tmp_path: Path) -> None:
    runtime = FakeRuntime(safe_ready())
    zygotes = ImportEnvZygotes()
    pool = pool_with(runtime, bundles, tmp_path, clock=Clock(), policy=EvictionPolicy(),
                     zygotes=zygotes)
    await pool.ensure(spec("one", "d1"), MANIFEST, materialized("s1"))
    await pool.ensure(spec("two", "d2"), MANIFEST, materialized("s2"))
    # The second function's template is forked from the learned zygote at once.
    assert zygotes.asked == [{}, {"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "1"}]
