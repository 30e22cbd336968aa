"""The agent's template pool and fork safety, with a fake runtime: a template whose
imports initialised CUDA is stopped at once, its verdict is kept (no second template
start per restore), logged once per snapshot, never offered for builds, and dropped
with its snapshots. Templates run with torch's NVML-based CUDA check."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from thaw.core.errors import InstanceFailed
from thaw.platform.docker.spec import ContainerLayout, ContainerSettings, container_kwargs
from thaw.platform.launch import build_spec, template_spec
from thaw.platform.runtime import LaunchSpec, RuntimeCapabilities
from thaw.platform.sandbox.areas import TenantAreas
from thaw.platform.templates import TemplatePool
from thaw.proto import agent_pb2, manifest_pb2

SPEC = agent_pb2.FunctionSpec(tenant="acme", name="gpu", version="1", handler="app:Gpu",
                              bundle_digest="b1")
MANIFEST = manifest_pb2.SnapshotManifest(modules=["app"])
REASON = "torch initialised CUDA at import (module app)"


class FakeProcess:
    def __init__(self) -> None:
        self.returncode: int | None = None
        self.pid = 4242

    async def wait(self) -> int:
        return self.returncode or 0


class FakeTemplate:
    """A launched template that answers its first status line and then idles."""

    def __init__(self, ready: dict[str, Any]) -> None:
        self.proc = FakeProcess()
        self.pid = self.proc.pid
        self.events = asyncio.StreamReader()
        self._ready = ready
        self.killed = False

    async def next_event(self, timeout: float) -> dict[str, Any]:
        return dict(self._ready)

    async def kill(self) -> None:
        self.killed = True
        self.proc.returncode = -9
        self.events.feed_eof()


class FakeRuntime:
    name = "fake"
    capabilities = RuntimeCapabilities()

    def __init__(self, ready: dict[str, Any]) -> None:
        self.ready = ready
        self.launched: list[tuple[LaunchSpec, FakeTemplate]] = []

    async def launch(self, spec: LaunchSpec) -> FakeTemplate:
        template = FakeTemplate(self.ready)
        self.launched.append((spec, template))
        return template


def unsafe_ready() -> dict[str, Any]:
    return {"event": "template_ready", "pid": 4242, "timings": {"import": 1.5},
            "fork_safe": False, "unsafe_reason": REASON}


def safe_ready() -> dict[str, Any]:
    return {"event": "template_ready", "pid": 4242, "timings": {"import": 1.5}}


def materialized(key: str) -> Any:
    return SimpleNamespace(key=key, snapshot_json=f"/shm/{key}/snapshot.json")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "app.py").write_text("class Gpu: ...\n")
    return folder


def pool_for(runtime: FakeRuntime, bundle: Path, tmp_path: Path) -> TemplatePool:
    tasks: list[asyncio.Task[None]] = []

    async def ensure_bundle(digest: str) -> Path:
        return bundle

    def spawn_task(coro: Coroutine[Any, Any, None]) -> None:
        tasks.append(asyncio.ensure_future(coro))

    areas = TenantAreas(home=tmp_path, run_dir=tmp_path, uid_range=(200000, 200009),
                        owned=False)
    return TemplatePool(runtime=runtime, areas=areas,  # type: ignore[arg-type]
                        start_timeout=5.0, ensure_bundle=ensure_bundle, spawn_task=spawn_task)


def unsafe_warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"].startswith("template not fork-safe")]


async def test_an_unsafe_template_is_stopped_and_its_verdict_kept(bundle: Path,
                                                                  tmp_path: Path) -> None:
    runtime = FakeRuntime(unsafe_ready())
    pool = pool_for(runtime, bundle, tmp_path)
    with capture_logs() as logs:
        first = await pool.ensure(SPEC, MANIFEST, materialized("snap1"))
        again = await pool.ensure(SPEC, MANIFEST, materialized("snap1"))
        other = await pool.ensure(SPEC, MANIFEST, materialized("snap2"))
    assert first.fork_safe is False and first.unsafe_reason == REASON
    assert again is first and other is first
    assert len(runtime.launched) == 1  # one template start, however many restores
    assert runtime.launched[0][1].killed and not first.running
    assert pool.templates == {} and list(pool.fork_unsafe.values()) == [first]
    warnings = unsafe_warnings(logs)
    assert [w["snapshot"] for w in warnings] == ["snap1", "snap2"]  # once per snapshot
    assert all(w["reason"] == REASON and w["log_level"] == "warning" for w in warnings)
    assert await pool.with_code(SPEC) is None  # builds never fork from it either


async def test_collecting_its_snapshots_forgets_the_verdict(bundle: Path,
                                                            tmp_path: Path) -> None:
    runtime = FakeRuntime(unsafe_ready())
    pool = pool_for(runtime, bundle, tmp_path)
    await pool.ensure(SPEC, MANIFEST, materialized("snap1"))
    await pool.collect({"snap1"})
    assert len(pool.fork_unsafe) == 1
    await pool.collect(set())
    assert pool.fork_unsafe == {}
    runtime.ready = safe_ready()  # say, the function's next version imports lazily
    with capture_logs() as logs:
        template = await pool.ensure(SPEC, MANIFEST, materialized("snap1"))
    assert template.fork_safe and template.running and len(runtime.launched) == 2
    assert unsafe_warnings(logs) == []
    await pool.close()


async def test_a_safe_template_keeps_running_and_serves_builds(bundle: Path,
                                                               tmp_path: Path) -> None:
    runtime = FakeRuntime(safe_ready())
    pool = pool_for(runtime, bundle, tmp_path)
    template = await pool.ensure(SPEC, MANIFEST, materialized("snap1"))
    assert template.fork_safe and template.unsafe_reason == "" and template.running
    assert template.import_seconds == 1.5
    assert await pool.with_code(SPEC) is template
    await pool.close()


async def test_templates_run_with_the_nvml_based_cuda_check(bundle: Path,
                                                            tmp_path: Path) -> None:
    runtime = FakeRuntime(safe_ready())
    pool = pool_for(runtime, bundle, tmp_path)
    await pool.ensure(SPEC, MANIFEST, materialized("snap1"))
    spec = runtime.launched[0][0]
    assert spec.environment["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    await pool.close()


def test_template_containers_carry_the_nvml_check_and_builds_do_not() -> None:
    spec = template_spec(SPEC, Path("/b"), key="k" * 24, snapshot_json='{"modules":[]}',
                         control="/dev/shm/run/t.sock", log_path="/home/logs/t.log")
    settings = ContainerSettings(image="thaw/base:test", node_id="n1", agent_id="a1",
                                 agent_pid=4242)
    layout = ContainerLayout(name="t1", uid=200_007, status_dir="/state/t1/ctl",
                             log_dir="/home/logs", log_private="/home/logs/.containers/t1",
                             run_dir="/dev/shm/run", run_private="/state/t1/run")
    environment = container_kwargs(spec, settings, layout)["environment"]
    assert environment["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    build = build_spec(SPEC, Path("/b"), out=Path("/out/b1"), log_path="/home/logs/b.log")
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in build.environment


@pytest.mark.parametrize("event", [
    {"event": "template_ready", "pid": 1, "timings": {}, "fork_safe": "false"},
    {"event": "failed", "stage": "import", "reason": "ImportError: no module named x"},
])
async def test_a_template_that_does_not_say_ready_plainly_fails(
    bundle: Path, tmp_path: Path, event: dict[str, Any]
) -> None:
    runtime = FakeRuntime(event)
    pool = pool_for(runtime, bundle, tmp_path)
    with pytest.raises(InstanceFailed, match="template failed"):
        await pool.ensure(SPEC, MANIFEST, materialized("snap1"))
    assert runtime.launched[0][1].killed and pool.fork_unsafe == {}


async def test_a_build_never_forks_another_tenants_template(bundle: Path,
                                                            tmp_path: Path) -> None:
    runtime = FakeRuntime(safe_ready())
    runtime.capabilities = RuntimeCapabilities(template_per_tenant=True,
                                               uid_per_tenant=True)
    pool = pool_for(runtime, bundle, tmp_path)
    template = await pool.ensure(SPEC, MANIFEST, materialized("snap1"))
    assert await pool.with_code(SPEC) is template
    other = agent_pb2.FunctionSpec()
    other.CopyFrom(SPEC)
    other.tenant = "mallory"  # the same code under another tenant
    assert await pool.with_code(other) is None
    egress = agent_pb2.FunctionSpec()
    egress.CopyFrom(SPEC)
    egress.network = "egress"  # the same tenant and code with another network
    assert await pool.with_code(egress) is None
    await pool.close()


async def test_copies_listing_the_same_modules_share_one_template(bundle: Path,
                                                                  tmp_path: Path) -> None:
    """A copy built fresh and a copy built in that copy's template list the same
    modules, one in another order and with a module setup() imported again: one
    template serves both, whatever their names."""
    pool = pool_for(FakeRuntime(safe_ready()), bundle, tmp_path)
    fresh = manifest_pb2.SnapshotManifest(modules=["app", "torch", "tok"])
    forked = manifest_pb2.SnapshotManifest(modules=["app", "torch", "tok", "tok"])
    reordered = manifest_pb2.SnapshotManifest(modules=["torch", "app", "tok"])
    copy = agent_pb2.FunctionSpec(tenant="acme", name="gpu-2", version="1",
                                  handler="app:Gpu", bundle_digest="b1")
    key = await pool.key(SPEC, fresh)
    assert await pool.key(copy, forked) == key
    assert await pool.key(copy, reordered) == key
    other = manifest_pb2.SnapshotManifest(modules=["app", "torch"])
    assert await pool.key(copy, other) != key  # other imports: another template
    first = await pool.ensure(SPEC, fresh, materialized("snap1"))
    second = await pool.ensure(copy, forked, materialized("snap2"))
    assert second is first
