"""Cold starts: choose a node for the slice (evicting idle instances when nothing
fits), restore or start the instance there, try other nodes when one is gone, lacks
the image or fails the restore, and quarantine a snapshot only for its own faults
(restore_book.py)."""

from __future__ import annotations

import asyncio

import structlog

from thaw.core.errors import ImageNotOnNode, ThawError, Unavailable
from thaw.proto import agent_pb2, manifest_pb2
from thaw.scheduler.events import EventKind
from thaw.scheduler.fleet import Fleet
from thaw.scheduler.instances import Instances
from thaw.scheduler.nodes import NodeView
from thaw.scheduler.placement import Candidate, IdleInstance, choose_node, plan_eviction
from thaw.scheduler.plane_state import PlaneState, fn_name, spec_message
from thaw.scheduler.pools import FunctionPool, InstanceView
from thaw.scheduler.pressure import PressureLevel
from thaw.scheduler.restore_book import Fault, RestoreBook, failure_signature, fault_of
from thaw.scheduler.secrets_delivery import with_secrets
from thaw.scheduler.states import FunctionState, InstanceState, NodeState, SnapshotState
from thaw.scheduler.store import FunctionRecord, new_id
from thaw.scheduler.tiers import Tiers
from thaw.scheduler.volumes import fill_mounts
from thaw.snapshotter.manifest import has_device_arena, manifest_key

log = structlog.get_logger()

# A restore or fresh start beyond this is treated as failed (the agent's own
# start_timeout should fire first; keep this larger than THAW_START_TIMEOUT).
START_RPC_TIMEOUT = 900.0

Timings = tuple[tuple[str, float], ...]


class NoRoom(Exception):
    """No node can take the slice and nothing idle can be evicted for it."""


class Starts:
    def __init__(self, state: PlaneState, fleet: Fleet, instances: Instances,
                 tiers: Tiers) -> None:
        self.s = state
        self.fleet = fleet
        self.instances = instances
        self.tiers = tiers
        self.book = RestoreBook(state.events.registry, clock=state.clock)
        """Failed restores per snapshot: what decides a quarantine."""
        self._quarantined: set[str] = set()
        """Snapshots quarantined here: a start that was restoring one at the same time
        and fails too does not quarantine it twice."""

    def _candidates(self, fn: FunctionRecord, key: str, holders: set[str],
                    excluded: set[str], evicting: bool = False) -> list[Candidate]:
        """Nodes that may take a cold start: ready and not excluded. A node in memory
        EMERGENCY takes no new cold starts into its free memory; when `evicting`, it
        is offered with no free memory, so that only what its own idle instances
        give back can hold the new slice (its usage does not grow)."""
        out = []
        per_node = self._per_node(fn)
        for n in self.s.runnable_nodes(fn):
            if n.id in excluded:
                continue
            free = n.device_free()
            if self.s.pressure.node_level(n.id) >= PressureLevel.EMERGENCY:
                if not evicting:
                    continue
                free = [0] * len(free)
            out.append(Candidate(node_id=n.id, device_free=free,
                                 snapshot_pinned=bool(key) and key in n.pinned.snapshot_keys,
                                 snapshot_on_disk=n.id in holders,
                                 starts_in_flight=n.starts_in_flight,
                                 same_function=per_node.get(n.id, 0)))
        return out

    def _per_node(self, fn: FunctionRecord) -> dict[str, int]:
        """Node id -> instances of `fn` there, running or being started."""
        pool = self.s.pools.get(fn.id)
        per_node: dict[str, int] = {}
        for inst in pool.instances.values() if pool is not None else ():
            per_node[inst.node_id] = per_node.get(inst.node_id, 0) + 1
        for function_id, node_id in self.s.placing.values():
            if function_id == fn.id:
                per_node[node_id] = per_node.get(node_id, 0) + 1
        return per_node

    def _idle_instances(self) -> list[IdleInstance]:
        idle = []
        for pool in self.s.pools.values():
            for inst in pool.instances.values():
                node = self.s.nodes.get(inst.node_id)
                if not inst.idle or node is None or inst.id not in node.slices:
                    continue
                index, nbytes = node.slices[inst.id]
                idle.append(IdleInstance(inst.id, pool.function_id, inst.node_id, index,
                                         nbytes, inst.last_used))
        return idle

    def _spare(self) -> dict[str, int]:
        """Per function, live instances above its min_instances: what eviction may take."""
        return {fid: max(0, p.ready_count() - p.min_instances)
                for fid, p in self.s.pools.items()}

    def choose(self, fn: FunctionRecord, key: str, holders: set[str],
               excluded: set[str], need: int) -> NodeView | None:
        """The node a cold start of `fn` goes to when a slice of `need` bytes fits
        somewhere without evicting, or None: choose_node's answer over _candidates,
        found without visiting every node. Nodes holding the snapshot (pinned or disk
        tier) rank above every other, so they are offered to choose_node as they are;
        of the others only the best by choose_node's order after the tier (starts in
        flight, least left over, fewer instances of the function, node id) can win:
        the placement index finds it, and it is offered with them."""
        s = self.s
        per_node = self._per_node(fn)
        image = fn.spec.runtime.image
        pinned_on = s.placement.pinned_on(key) if key else set()
        offered: list[Candidate] = []
        for node_id in sorted(pinned_on | holders):
            n = s.nodes.get(node_id)
            if (n is None or n.state is not NodeState.READY or node_id in excluded
                    or not n.runs(image)
                    or s.pressure.node_level(node_id) >= PressureLevel.EMERGENCY):
                continue
            offered.append(Candidate(n.id, n.device_free(), node_id in pinned_on,
                                     node_id in holders, n.starts_in_flight,
                                     per_node.get(node_id, 0)))
        other = s.placement.best(need, excluded | pinned_on | holders, per_node, image)
        if other is not None:
            n = s.nodes[other]
            offered.append(Candidate(n.id, n.device_free(),
                                     starts_in_flight=n.starts_in_flight,
                                     same_function=per_node.get(n.id, 0)))
        chosen = choose_node(offered, need)
        return None if chosen is None else s.nodes[chosen.node_id]

    async def _place(self, fn: FunctionRecord, instance_id: str, need: int, key: str,
                     holders: set[str], excluded: set[str]) -> NodeView:
        """Choose a node and charge the slice to its ledger; evict idle instances (LRU,
        never below min_instances) if nothing fits; NoRoom if that cannot help."""
        chosen = self.choose(fn, key, holders, excluded, need)
        if chosen is not None:
            node = chosen
        else:
            plan = plan_eviction(self._candidates(fn, key, holders, excluded, evicting=True),
                                 self._idle_instances(), need, self._spare())
            if plan is None:
                raise NoRoom(f"no node has {need} bytes of slice memory free for "
                             f"{fn_name(fn)} and no idle instance can be evicted for it")
            victims: list[tuple[FunctionPool, InstanceView]] = []
            reason = f"evicted to make room for {fn_name(fn)}"
            for victim in plan.victims:
                pool = self.s.pools[victim.function_id]
                inst = pool.instances.get(victim.instance_id)
                if inst is not None and inst.idle:
                    inst.move(InstanceState.STOPPING, reason)  # no request may pick it now
                    victims.append((pool, inst))
            await asyncio.gather(*(self.instances.stop(
                pool, inst, reason, kind=EventKind.INSTANCE_EVICTED) for pool, inst in victims))
            node = self.s.nodes[plan.node_id]
            if node.state is not NodeState.READY:
                raise NoRoom(f"node {node.id} went away while making room for "
                             f"{fn_name(fn)}")
        if node.reserve(instance_id, need) is None:
            # Another start took the room while the victims stopped: the caller
            # waits for room and tries again.
            raise NoRoom(f"no node has {need} bytes of slice memory free for "
                         f"{fn_name(fn)} (the room made was taken)")
        return node

    async def start_instance(self, fn: FunctionRecord) -> tuple[InstanceView, Timings]:
        """Place and start a new instance of the function's version: NoRoom when
        nothing fits and nothing can be evicted, QuotaExceeded past the tenant's
        quota, ThawError when no node could start it."""
        s = self.s
        await self.fleet.wait_for_node()
        self.fleet.check_runtime(fn)
        manifest = None
        holders: set[str] = set()
        key = ""
        if fn.start_mode == "restore" and fn.snapshot_id:
            snap = await s.store.run(s.store.get_snapshot, fn.snapshot_id)
            if snap.state is SnapshotState.READY and snap.manifest:
                manifest = manifest_pb2.SnapshotManifest.FromString(snap.manifest)
                key = manifest_key(manifest)
                holders = s.holders.setdefault(snap.id, {snap.node_id})
        need = fn.spec.resources.gpu_memory
        instance_id = new_id("inst")
        # Past the tenant's quota -> QuotaExceeded (429); its warm instances still serve.
        await s.quotas.claim(fn.tenant, instance_id, need, s.pools.values())
        try:
            return await self._start_placed(fn, instance_id, need, manifest, key, holders)
        finally:
            s.placing.pop(instance_id, None)
            s.quotas.release(instance_id)

    async def _start_placed(self, fn: FunctionRecord, instance_id: str, need: int,
                            manifest: manifest_pb2.SnapshotManifest | None, key: str,
                            holders: set[str]) -> tuple[InstanceView, Timings]:
        s = self.s
        excluded: dict[str, str] = {}  # nodes that take no start now -> why
        lacking: dict[str, str] = {}  # docker nodes whose engine lacks the image -> why
        failed_here: dict[str, str] = {}  # nodes whose restore failed in this start -> why
        # Nodes that failed to restore this snapshot (now or in an earlier start) in a
        # way that may be its fault: other nodes restore it first.
        no_restore = self.book.failed_nodes(fn.snapshot_id) if (
            manifest is not None and fn.snapshot_id) else {}
        if manifest is not None and has_device_arena(manifest):
            no_restore.update({n.id: "no CUDA device for the snapshot's device arena"
                               for n in s.runnable_nodes(fn)
                               if not any(d.kind == "cuda" for d in n.devices)})
        while True:
            if lacking and all(n.id in lacking for n in s.runnable_nodes(fn)):
                raise self.fleet.image_missing(fn, lacking)
            try:
                node = await self._place(fn, instance_id, need, key, holders,
                                         set(excluded) | set(no_restore))
            except NoRoom as exc:
                if manifest is not None and no_restore:
                    # Every node that may still restore it is full or out: run fresh
                    # on one of the others now rather than wait.
                    log.warning("no other node to restore on; starting fresh",
                                function=fn_name(fn), failed=sorted(no_restore))
                    if failed_here:
                        self._fresh_after_failures(fn, failed_here)
                    manifest, key, no_restore = None, "", {}
                    continue
                if excluded:
                    raise NoRoom(f"{exc}; tried: " + "; ".join(
                        f"{node_id}: {why}" for node_id, why in excluded.items())) from exc
                raise
            s.placing[instance_id] = (fn.id, node.id)
            node.starts_in_flight += 1
            node.starting_ids.add(instance_id)
            try:
                resp = await self._start_on(node, fn, instance_id, manifest, holders)
                if manifest is not None and fn.snapshot_id:
                    self.book.forget(fn.snapshot_id)  # it restores: not broken
                break
            except ImageNotOnNode as exc:
                node.unreserve(instance_id)
                log.warning("image not on node; trying another", node=node.id,
                            function=fn_name(fn), error=str(exc))
                excluded[node.id] = str(exc)
                lacking[node.id] = str(exc)
            except ThawError as exc:
                node.unreserve(instance_id)
                fault = fault_of(exc)
                if fault is None:
                    raise
                if isinstance(exc, Unavailable) and not await node.client.alive():
                    await self.fleet.mark_lost(node, f"unreachable while starting: {exc}")
                if manifest is None or fn.snapshot_id is None:
                    if fault is not Fault.NODE:
                        raise
                    # A fresh start: the node is gone or its memory is not what the
                    # ledger says; try the other nodes before giving up.
                    log.warning("start failed on node; trying another", node=node.id,
                                function=fn_name(fn), error=str(exc))
                    excluded[node.id] = str(exc)
                    continue
                if await self._restore_failed(fn, node, fault, exc):
                    manifest, key, no_restore = None, "", {}  # quarantined: run fresh
                elif fault is Fault.CHUNKS:
                    # The data is out of reach (its nodes are down), not broken: start
                    # fresh this time and keep the snapshot.
                    manifest, key, no_restore = None, "", {}
                elif fault is Fault.NODE:
                    excluded[node.id] = str(exc)
                else:
                    no_restore[node.id] = failed_here[node.id] = str(exc)
            except BaseException:
                node.unreserve(instance_id)
                raise
            finally:
                node.starts_in_flight -= 1
                node.starting_ids.discard(instance_id)
        start = "restore" if resp.kind == agent_pb2.START_RESTORE else "fresh"
        if start == "fresh" and fn.start_mode == "fresh" and resp.input_schema:
            # A version that is never built learns its input schema from a start.
            await s.store.run(s.versions.learn_input_schema, fn.id, fn.version,
                              resp.input_schema)
        if start == "restore" and fn.snapshot_id and manifest is not None:
            holders.add(node.id)  # it fetched the chunks it lacked
            self.tiers.keep_pinned(node, manifest)
        await s.store.run(s.store.add_instance, instance_id, fn.id, fn.version, node.id,
                          start)
        inst = InstanceView(id=instance_id, function_id=fn.id, version=fn.version,
                            node_id=node.id, start=start, gpu_memory=need,
                            last_used=s.clock())
        s.events.emit(EventKind.INSTANCE_STARTED,
                      f"instance {instance_id} of {fn_name(fn)} started ({start})",
                      node_id=node.id, function=fn_name(fn), instance=instance_id,
                      start=start)
        log.info("instance started", function=fn_name(fn), instance=instance_id,
                 node=node.id, start=start,
                 timings={t.stage: round(t.seconds, 4) for t in resp.timings})
        return inst, tuple((t.stage, t.seconds) for t in resp.timings)

    async def _start_on(self, node: NodeView, fn: FunctionRecord, instance_id: str,
                        manifest: manifest_pb2.SnapshotManifest | None, holders: set[str]
                        ) -> agent_pb2.StartInstanceResponse:
        """Restore the snapshot on the node, or start fresh there without one."""
        nodes = self.s.nodes
        kind = agent_pb2.START_RESTORE if manifest is not None else agent_pb2.START_FRESH
        peers = [nodes[h].control_address for h in sorted(holders)
                 if h != node.id and h in nodes and nodes[h].state is not NodeState.LOST]
        # Read at each start: a rotated secret reaches the next instance.
        function = await fill_mounts(self.s.store,
                                     await with_secrets(self.s, fn, spec_message(fn)))
        return await node.client.start_instance(agent_pb2.StartInstanceRequest(
            instance_id=instance_id, function=function, kind=kind,
            manifest=manifest, peers=peers), timeout=START_RPC_TIMEOUT)

    async def _restore_failed(self, fn: FunctionRecord, node: NodeView, fault: Fault,
                              exc: ThawError) -> bool:
        """Judge a failed restore of fn's snapshot on `node`, say so (event, metric)
        and quarantine the snapshot where it is its own fault: corrupt or of another
        version; a fingerprint that every runnable node refused; the same failure on
        a second node. True when quarantined."""
        assert fn.snapshot_id is not None
        snapshot = fn.snapshot_id
        why = ""
        if fault is Fault.SNAPSHOT:
            why = str(exc)
        elif fault in (Fault.FINGERPRINT, Fault.UNKNOWN):
            signature = failure_signature(exc, node.id)
            same = self.book.record(snapshot, node.id, fault, signature)
            if fault is Fault.FINGERPRINT and self.book.refused_by_all(
                    snapshot, (n.id for n in self.s.runnable_nodes(fn))):
                why = f"no node can run it: {exc}"
            elif same is not None:
                why = f"it failed the same way on {same} and {node.id}: {exc}"
        quarantined = bool(why)
        self.book.count(fault, quarantined)
        name = fn_name(fn)
        if quarantined:
            if snapshot not in self._quarantined:
                self._quarantined.add(snapshot)
                await self._quarantine(fn, why)
            self.book.forget(snapshot)
            self.s.events.emit(EventKind.RESTORE_FAILED,
                               f"restore of {name} on {node.id} failed: {exc}",
                               node_id=node.id, function=name, snapshot=snapshot,
                               quarantined=True)
        elif fault is Fault.CHUNKS:
            log.warning("snapshot chunks unreachable; starting fresh", function=name,
                        error=str(exc))
            self.s.events.emit(EventKind.RESTORE_FAILED,
                               f"restore of {name} on {node.id} failed: {exc}",
                               node_id=node.id, function=name, snapshot=snapshot,
                               quarantined=False)
        else:
            log.warning("restore failed on node; trying elsewhere", node=node.id,
                        function=name, fault=fault.value, error=str(exc))
            self.s.events.emit(EventKind.RESTORE_RETRIED,
                               f"restore of {name} on {node.id} failed ({fault.value}); "
                               f"not quarantined, the start tries another node: {exc}",
                               node_id=node.id, function=name, snapshot=snapshot,
                               fault=fault.value)
        return quarantined

    def _fresh_after_failures(self, fn: FunctionRecord, failed: dict[str, str]) -> None:
        """The restores of this start failed, not proven the snapshot's fault, and no
        other node may try: it starts fresh, the snapshot kept (one restore_failed
        event, as for any restore that ends in a fresh start)."""
        last = next(reversed(failed))
        self.s.events.emit(
            EventKind.RESTORE_FAILED,
            f"restore of {fn_name(fn)} failed on {', '.join(failed)}; starting fresh, "
            f"the snapshot is kept: {failed[last]}",
            node_id=last, function=fn_name(fn), snapshot=fn.snapshot_id or "",
            quarantined=False)

    async def _quarantine(self, fn: FunctionRecord, reason: str) -> None:
        """A restore failed: never use this snapshot again; run fresh (no rebuild loop)."""
        assert fn.snapshot_id is not None
        store = self.s.store
        await store.run(store.finish_snapshot, fn.snapshot_id,
                        SnapshotState.QUARANTINED, reason=reason)
        await store.run(store.set_function_state, fn.id, fn.version, FunctionState.READY,
                        f"snapshot quarantined after a failed restore: {reason}; "
                        "runs with fresh starts", "fresh")
        await store.run(self.s.versions.run_fresh, fn.id, fn.version,
                        f"snapshot quarantined after a failed restore: {reason}")
        log.error("snapshot quarantined", function=fn_name(fn),
                  snapshot=fn.snapshot_id, reason=reason)
        self.s.events.emit(EventKind.SNAPSHOT_QUARANTINED,
                           f"snapshot {fn.snapshot_id} of {fn_name(fn)} quarantined: {reason}",
                           function=fn_name(fn), snapshot=fn.snapshot_id)
