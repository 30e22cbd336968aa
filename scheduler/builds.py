"""Functions and their versions: deploying one (an immutable version), building its
snapshot on a node and preparing its template, switching the serving version, rolling
back, and deleting. The DB side of versions is versions.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog

from thaw.core.bundle import MAX_BUNDLE_BYTES, BundleLimits
from thaw.core.errors import (
    DeadlineExceeded,
    FunctionUnavailable,
    ImageNotOnNode,
    InsufficientStorage,
    InvalidArgument,
    NodeFault,
    NotFound,
    ThawError,
    Unavailable,
)
from thaw.core.logs import bound_reason
from thaw.core.spec import read_bundle
from thaw.proto import agent_pb2, manifest_pb2
from thaw.scheduler.blobs import check_bundle_size
from thaw.scheduler.build_steps import BuildSteps
from thaw.scheduler.bundles import bundle_digest
from thaw.scheduler.deploy_limits import check_fleet, check_quota
from thaw.scheduler.events import EventKind
from thaw.scheduler.fleet import NODE_WAIT_SECONDS, Fleet
from thaw.scheduler.instances import Instances
from thaw.scheduler.nodes import NodeView
from thaw.scheduler.plane_state import PlaneState, build_key, fn_name, spec_message
from thaw.scheduler.secrets_delivery import check_secrets_exist, with_secrets
from thaw.scheduler.starts import START_RPC_TIMEOUT
from thaw.scheduler.states import FunctionState, InstanceState, SnapshotState, VersionState
from thaw.scheduler.store import FunctionRecord
from thaw.scheduler.tiers import Tiers
from thaw.scheduler.versions import VersionRecord, as_function
from thaw.scheduler.volumes import check_mounts, fill_mounts

log = structlog.get_logger()


def storage_refusal(nodes: list[NodeView], refused: dict[str, str]
                    ) -> InsufficientStorage | None:
    """When every one of `nodes` (at least one) is full or read-only (by its last
    heartbeat, or by its refusal in `refused` naming insufficient storage), the 507
    naming each node and directory; else None."""
    why = {}
    for node in nodes:
        fault = node.storage_fault()
        if fault is not None:
            why[node.id] = (f"insufficient storage on node {node.id}: {fault.path} is "
                            f"{fault.type.replace('_', '-')} ({fault.message})")
        elif "insufficient storage" in refused.get(node.id, ""):
            why[node.id] = refused[node.id]
        else:
            return None
    if not why:
        return None
    return InsufficientStorage("; ".join(why.values()) + "; nothing can be built",
                               field="node")


@dataclass(frozen=True)
class Deployed:
    """What a deploy did: the function afterwards, and whether the bundle was the
    one it serves already (then no version was made and nothing built)."""

    function: FunctionRecord
    unchanged: bool = False


class Builds:
    def __init__(self, state: PlaneState, fleet: Fleet, instances: Instances,
                 tiers: Tiers) -> None:
        self.s = state
        self.fleet = fleet
        self.instances = instances
        self.tiers = tiers
        self.steps = BuildSteps()
        """The current step of each build running here (nodes' heartbeats)."""

    async def create_function(self, tenant: str, bundle: bytes, wait: bool) -> FunctionRecord:
        """Deploy (see `deploy`); the function as it is afterwards."""
        return (await self.deploy(tenant, bundle, wait)).function

    async def deploy(self, tenant: str, bundle: bytes, wait: bool, force: bool = False,
                     limits: BundleLimits | None = None) -> Deployed:
        """Deploy a new immutable version. A function already serving keeps serving its
        active version while the new one builds; the switch is atomic (versions.py).
        The bundle the function serves already (same digest) is no new version: it is
        kept, nothing is built, and the answer says unchanged; `force` makes it a new
        version all the same (built again: say, on nodes that changed since)."""
        s = self.s
        # Off the loop: reading a bundle decompresses up to its unpacked limit.
        spec = await asyncio.to_thread(read_bundle, bundle, limits)
        digest = await asyncio.to_thread(bundle_digest, bundle)
        kept = None if force else await s.store.run(s.versions.keep_unchanged, tenant,
                                                    spec.name, digest)
        if kept is not None:
            log.info("redeploy unchanged; version kept", function=f"{tenant}/{spec.name}",
                     version=kept.version, digest=digest)
            return Deployed(kept, unchanged=True)
        check_quota(spec, await s.quotas.quota_of(tenant))
        check_fleet(spec, s.nodes.values())
        await check_secrets_exist(s, tenant, spec.secrets)
        await s.store.run(check_bundle_size, s.store, tenant, len(bundle))
        await s.store.run(check_mounts, s.store, tenant, spec)
        refused = storage_refusal(
            [n for n in s.ready_nodes() if n.runs(spec.runtime.image)], {})
        if refused is not None:
            raise refused  # 507 now, not a build that fails writing
        await asyncio.to_thread(s.bundles.put, bundle)
        if spec.snapshot:
            fn, version = await s.store.run(s.versions.deploy, tenant, spec, digest,
                                            "restore", True)
        else:
            fn, version = await s.store.run(
                s.versions.deploy, tenant, spec, digest, "fresh", False,
                "snapshots disabled in thaw.toml: runs with fresh starts")
            self.switched(fn)
        log.info("function deployed", function=f"{tenant}/{spec.name}",
                 version=version.version, state=version.state.value,
                 serving=fn.version if fn.state is FunctionState.READY else None)
        if version.state is VersionState.BUILDING:
            task = self._start_build(as_function(fn, version), bundle)
            if wait:
                return Deployed(await asyncio.shield(task))
        return Deployed(fn)

    def _start_build(self, target: FunctionRecord, bundle: bytes
                     ) -> asyncio.Task[FunctionRecord]:
        key = build_key(target.id, target.version)
        step = (target.tenant, target.name, target.version)
        self.steps.begin(step)
        task = asyncio.create_task(self._build(target, bundle))
        self.s.builds[key] = task

        def done(_t: asyncio.Task[FunctionRecord]) -> None:
            self.s.builds.pop(key, None)
            self.steps.end(step)

        task.add_done_callback(done)
        return task

    def switched(self, fn: FunctionRecord) -> None:
        """`fn` (its active version) was just made the serving version in the DB: new
        acquires place it; instances of any other version are retired, the idle ones
        now, the busy ones when their in-flight calls are done."""
        self.s.active[fn.id] = (fn.version, time.time())
        self.s.pool(fn)
        self.instances.retire_old_versions(fn)
        self.s.events.emit(EventKind.VERSION_ACTIVATED,
                           f"{fn_name(fn)} now serves version {fn.version}",
                           function=fn_name(fn), version=str(fn.version))
        log.info("version activated", function=fn_name(fn), version=fn.version)

    async def get_function(self, tenant: str, name: str) -> FunctionRecord:
        return await self.s.store.run(self.s.store.get_function, tenant, name)

    async def list_functions(self, tenant: str) -> list[FunctionRecord]:
        return await self.s.store.run(self.s.store.list_functions, tenant)

    async def delete_function(self, tenant: str, name: str) -> None:
        s = self.s
        fn = await s.store.run(s.store.get_function, tenant, name)
        await s.store.run(s.store.set_function_state, fn.id, fn.version,
                          FunctionState.DELETED, "deleted")
        for key in [k for k in s.builds if k.startswith(f"{fn.id}@")]:
            s.builds.pop(key).cancel()
        s.active.pop(fn.id, None)
        pool = s.pools.get(fn.id)
        if pool is not None:
            for inst in list(pool.instances.values()):
                if inst.inflight == 0:
                    await self.instances.stop(pool, inst, "function deleted")
                else:
                    inst.move(InstanceState.STOPPING, "function deleted")
        log.info("function deleted", function=f"{tenant}/{name}")
        s.spawn(self.tiers.collect_garbage())

    async def _build(self, fn: FunctionRecord, bundle: bytes) -> FunctionRecord:
        """Build the snapshot of version fn.version on a node, then switch to it (the
        active version serves meanwhile). A failure is recorded on the version; the
        function fails with it only if nothing else serves. Returns the function as
        it is afterwards."""
        s = self.s
        name = fn_name(fn)
        snapshot_id = ""
        lacking: dict[str, str] = {}  # docker nodes whose engine lacks the image -> why
        interrupted: dict[str, str] = {}  # nodes whose agent the build lost -> why
        try:
            await self.fleet.wait_for_node()
            while True:
                # An image function builds on a docker node that has its image.
                self.fleet.check_runtime(fn)
                node = await self._build_node(fn, lacking, interrupted)
                self.steps.set((fn.tenant, fn.name, fn.version),
                               f"starting the build on node {node.id}", node.id)
                snapshot_id = await s.store.run(s.store.create_snapshot, fn.id,
                                                fn.version, node.id)
                node.starts_in_flight += 1
                try:
                    resp = await node.client.build_snapshot(
                        agent_pb2.BuildSnapshotRequest(
                            function=await fill_mounts(
                                s.store, await with_secrets(s, fn, spec_message(fn))),
                            # Past one message's cap, the agent fetches it.
                            bundle=bundle if len(bundle) <= MAX_BUNDLE_BYTES else b""),
                        timeout=s.timeouts.build_timeout)
                    break
                except ImageNotOnNode as exc:
                    await s.store.run(s.store.finish_snapshot, snapshot_id,
                                      SnapshotState.FAILED, reason=str(exc))
                    snapshot_id = ""
                    lacking[node.id] = str(exc)
                    log.warning("image not on node; building on another", node=node.id,
                                function=name, error=str(exc))
                except InsufficientStorage as exc:
                    # Its disk filled since its last heartbeat: another node builds.
                    await s.store.run(s.store.finish_snapshot, snapshot_id,
                                      SnapshotState.FAILED, reason=str(exc))
                    snapshot_id = ""
                    lacking[node.id] = str(exc)
                except (Unavailable, NodeFault) as exc:
                    # The node, not the function: its agent died or went away mid-build.
                    why = await self._build_interrupted(fn, node, exc, interrupted)
                    await s.store.run(s.store.finish_snapshot, snapshot_id,
                                      SnapshotState.FAILED, reason=why)
                    snapshot_id = ""
                finally:
                    node.starts_in_flight -= 1
        except (ThawError, asyncio.TimeoutError) as exc:
            reason = bound_reason(f"snapshot build failed: {exc}")
            if snapshot_id:
                await s.store.run(s.store.finish_snapshot, snapshot_id,
                                  SnapshotState.FAILED, reason=reason)
            return await self._build_failed(fn, reason)

        if resp.ok:
            await s.store.run(s.store.finish_snapshot, snapshot_id, SnapshotState.READY,
                              manifest=resp.manifest.SerializeToString(),
                              stored_bytes=resp.stored_bytes)
            s.holders.setdefault(snapshot_id, set()).add(node.id)
            log.info("snapshot ready", function=name, version=fn.version,
                     snapshot=snapshot_id, bytes=resp.stored_bytes,
                     setup_s=round(resp.manifest.setup_seconds, 3))
            # Keep a template with the function's modules imported, so that the first
            # restore does not pay for imports; the switch (and a deploy that waits)
            # waits for it too.
            self.steps.set((fn.tenant, fn.name, fn.version),
                           f"preparing a template on node {node.id}", node.id)
            await self._prepare_template(node, fn, resp.manifest)
            updated = await s.store.run(s.versions.activate, fn.id, fn.version,
                                        start_mode="restore", snapshot_id=snapshot_id,
                                        input_schema=resp.manifest.input_schema)
            # Its manifest is now one the collection keeps: the build is over for it.
            s.builds.pop(build_key(fn.id, fn.version), None)
            s.spawn(self.tiers.collect_garbage())  # snapshots past the retained versions
        elif resp.stage == "capture":
            where = f" at {resp.attribute_path}" if resp.attribute_path else ""
            reason = bound_reason(f"state cannot be snapshotted{where}: {resp.reason}; "
                                  "runs with fresh starts")
            await s.store.run(s.store.finish_snapshot, snapshot_id, SnapshotState.FAILED,
                              reason=reason)
            # The schema the build read still checks requests of the fresh starts.
            updated = await s.store.run(s.versions.activate, fn.id, fn.version,
                                        start_mode="fresh", reason=reason,
                                        input_schema=resp.manifest.input_schema)
            log.warning("snapshot not possible", function=name, reason=reason)
        else:
            # The agent bounds what it sends; an older or hostile one is cut here too.
            reason = bound_reason(f"{resp.stage} failed: {resp.reason}")
            await s.store.run(s.store.finish_snapshot, snapshot_id, SnapshotState.FAILED,
                              reason=reason)
            return await self._build_failed(fn, reason)
        if updated is None:
            log.info("built version superseded; not activated", function=name,
                     version=fn.version)
            return await s.store.run(s.store.get_function_by_id, fn.id)
        self.switched(updated)
        return updated

    def build_attempts(self) -> int:
        """How many nodes a build may be interrupted on before it fails (the
        scheduler's build_attempts setting)."""
        return self.s.policy.build_attempts

    async def _build_node(self, fn: FunctionRecord, lacking: dict[str, str],
                          interrupted: dict[str, str]) -> NodeView:
        """The node to build on: the least busy runnable one, preferring nodes this
        build was not interrupted on; waits for one while interrupted nodes are away."""
        s = self.s
        deadline = s.clock() + NODE_WAIT_SECONDS
        while True:
            nodes = [n for n in s.runnable_nodes(fn)
                     if n.id not in lacking and n.storage_fault() is None]
            if nodes:
                fresh = [n for n in nodes if n.id not in interrupted]
                return min(fresh or nodes, key=lambda n: (n.starts_in_flight, n.id))
            storage = storage_refusal(s.runnable_nodes(fn), lacking)
            if storage is not None:
                raise storage
            if not interrupted:
                raise self.fleet.image_missing(fn, lacking)
            remaining = deadline - s.clock()
            if remaining <= 0:
                raise NodeFault("no node left to build on: " + "; ".join(
                    interrupted.values()))
            s.nodes_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.nodes_changed.wait(), remaining)

    async def _build_interrupted(self, fn: FunctionRecord, node: NodeView, exc: ThawError,
                                 interrupted: dict[str, str]) -> str:
        """Record a build the node lost (its agent died, stopped or went away): the node
        is written off at once if its agent no longer answers, and the build goes on
        elsewhere; past build_attempts it fails, naming every interruption."""
        s = self.s
        alive = await node.client.alive()
        why = (f"interrupted on node {node.id}: "
               + ("its agent died" if not alive else "its agent went away") + f" ({exc})")
        interrupted[node.id] = why
        if not alive:
            await self.fleet.mark_lost(node, f"its agent died during a build ({exc})")
        attempts = self.build_attempts()
        if len(interrupted) >= attempts:
            raise NodeFault(f"snapshot build interrupted {len(interrupted)} times "
                            f"(build_attempts = {attempts}): " + "; ".join(
                                interrupted.values()))
        s.events.emit(EventKind.BUILD_RETRIED,
                      f"{fn_name(fn)} version {fn.version}: build {why}; retrying on "
                      f"another node (attempt {len(interrupted) + 1} of {attempts})",
                      node_id=node.id, function=fn_name(fn), version=str(fn.version))
        log.warning("build interrupted; retrying", node=node.id, function=fn_name(fn),
                    error=str(exc), attempt=len(interrupted) + 1, attempts=attempts)
        return why

    async def rebuild_snapshot(self, fn: FunctionRecord, why: str
                               ) -> asyncio.Task[FunctionRecord]:
        """Build the snapshot of the serving version again from its stored bundle (its
        snapshot was quarantined for corrupt data no node could repair); it serves
        with fresh starts meanwhile and restores again once the build is done."""
        s = self.s
        bundle = await asyncio.to_thread(s.bundles.get, fn.bundle_digest)
        rebuilding = await s.store.run(s.versions.begin_rebuild, fn.id, fn.version)
        s.events.emit(EventKind.CHUNK_REPAIRED,
                      f"{fn_name(fn)} version {fn.version}: rebuilding its snapshot ({why})",
                      function=fn_name(fn), version=str(fn.version), how="rebuild")
        log.warning("rebuilding a corrupt snapshot", function=fn_name(fn),
                    version=fn.version, reason=why)
        return self._start_build(as_function(fn, rebuilding), bundle)

    async def _build_failed(self, fn: FunctionRecord, reason: str) -> FunctionRecord:
        updated = await self.s.store.run(self.s.versions.fail, fn.id, fn.version, reason)
        serving = updated is not None and updated.state is FunctionState.READY
        log.warning("build failed", function=fn_name(fn), version=fn.version,
                    reason=reason, serving=updated.version if serving and updated else None)
        self.s.events.emit(EventKind.BUILD_FAILED,
                           f"{fn_name(fn)} version {fn.version} failed to build: {reason}",
                           function=fn_name(fn), version=str(fn.version))
        return updated or fn

    async def _prepare_template(self, node: NodeView, fn: FunctionRecord,
                                manifest: manifest_pb2.SnapshotManifest) -> None:
        try:
            await node.client.prepare_template(
                agent_pb2.PrepareTemplateRequest(function=spec_message(fn), manifest=manifest),
                timeout=START_RPC_TIMEOUT)
        except ThawError as exc:
            log.warning("template not prepared", node=node.id, function=fn.name, error=str(exc))

    def building(self, fn: FunctionRecord) -> bool:
        """Is the build of fn's version running here?"""
        return build_key(fn.id, fn.version) in self.s.builds

    async def wait_built(self, fn: FunctionRecord, deadline: float) -> FunctionRecord:
        task = self.s.builds.get(build_key(fn.id, fn.version))
        if task is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(task),
                                              max(0.0, deadline - self.s.clock()))
            except TimeoutError as exc:
                raise DeadlineExceeded(
                    f"{fn.tenant}/{fn.name} is still building its snapshot") from exc
        return await self.s.store.run(self.s.store.get_function_by_id, fn.id)

    # ---- versions --------------------------------------------------------------

    def generation(self, function_id: str, version: int) -> float:
        """Since when `version` serves (unix time); 0.0 for a version that no longer
        does. Leases carry it: a gateway keeps using only the newest generation's."""
        active = self.s.active.get(function_id)
        return active[1] if active is not None and active[0] == version else 0.0

    async def list_versions(self, tenant: str, name: str
                            ) -> tuple[FunctionRecord, list[VersionRecord]]:
        """The function (its active version) and every version, newest first."""
        fn = await self.s.store.run(self.s.store.get_function, tenant, name)
        return fn, await self.s.store.run(self.s.versions.all, fn.id)

    async def rollback(self, tenant: str, name: str, version: int = 0
                       ) -> tuple[FunctionRecord, bool]:
        """Make `version` (0: the newest ready one before the active one) serve again:
        at once when its snapshot still exists (or it runs fresh), else after
        rebuilding its snapshot from its stored bundle while the active version keeps
        serving. Returns the function afterwards and whether it was rebuilt."""
        s = self.s
        fn, versions = await self.list_versions(tenant, name)
        if version == 0:
            earlier = [v for v in versions
                       if v.state is VersionState.READY and v.version < fn.version]
            if not earlier:
                raise InvalidArgument(f"{tenant}/{name} has no ready version before "
                                      f"version {fn.version} to roll back to",
                                      field="version")
            target = earlier[0]
        else:
            found = [v for v in versions if v.version == version]
            if not found:
                raise NotFound(f"{tenant}/{name} has no version {version}", field="version")
            target = found[0]
        if target.state is not VersionState.READY:
            why = f": {target.reason}" if target.reason else ""
            raise InvalidArgument(f"version {target.version} of {tenant}/{name} is "
                                  f"{target.state.value}{why}; only a ready version can "
                                  "serve", field="version")
        if target.version == fn.version and fn.state is FunctionState.READY:
            return fn, False
        if target.restorable:
            updated = await s.store.run(
                s.versions.activate, fn.id, target.version, start_mode=target.start_mode,
                reason=target.reason, after_build=False)
            if updated is None:
                raise NotFound(f"function {tenant}/{name} not found", field="name")
            self.switched(updated)
            log.info("rolled back", function=f"{tenant}/{name}", version=target.version)
            return updated, False
        bundle = await asyncio.to_thread(s.bundles.get, target.bundle_digest)
        rebuilding = await s.store.run(s.versions.begin_rebuild, fn.id, target.version)
        log.info("rolling back: rebuilding a collected snapshot", function=f"{tenant}/{name}",
                 version=target.version)
        after = await asyncio.shield(self._start_build(as_function(fn, rebuilding), bundle))
        if after.version != target.version or after.state is not FunctionState.READY:
            failed = await s.store.run(s.versions.get, fn.id, target.version)
            raise FunctionUnavailable(
                f"rebuilding the snapshot of version {target.version} of {tenant}/{name} "
                f"failed ({failed.reason}); version {after.version} still serves")
        return after, True
