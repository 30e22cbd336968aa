"""The end of an instance's life at the scheduler: stopping it on its node, forgetting
it (its slice freed, its DB row ended), and retiring instances of a version no longer
served. Every state change of an InstanceView goes through InstanceView.move."""

from __future__ import annotations

import asyncio

import structlog

from thaw.core.errors import ThawError
from thaw.scheduler.events import EventKind
from thaw.scheduler.nodes import NodeView
from thaw.scheduler.plane_state import PlaneState
from thaw.scheduler.pools import FunctionPool, InstanceView
from thaw.scheduler.states import InstanceState, NodeState
from thaw.scheduler.store import FunctionRecord

log = structlog.get_logger()


class Instances:
    def __init__(self, state: PlaneState) -> None:
        self.s = state

    async def stop(self, pool: FunctionPool, inst: InstanceView, reason: str,
                   kind: EventKind = EventKind.INSTANCE_STOPPED) -> None:
        inst.move(InstanceState.STOPPING, reason)
        node = self.s.nodes.get(inst.node_id)
        if node is not None and node.state is not NodeState.LOST:
            try:
                await node.client.stop_instance(inst.id, reason)
            except ThawError as exc:
                log.warning("stop failed", instance=inst.id, error=str(exc))
        await self.forget(inst.id, reason, kind)

    async def stop_quietly(self, node: NodeView, instance_id: str, reason: str) -> None:
        """Stop an instance the scheduler does not track (orphaned, failed)."""
        try:
            await node.client.stop_instance(instance_id, reason)
        except ThawError as exc:
            log.info("stop not delivered", node=node.id, instance=instance_id, error=str(exc))

    async def forget(self, instance_id: str, reason: str,
                     kind: EventKind = EventKind.INSTANCE_LOST) -> None:
        found = self.s.find_instance(instance_id)
        if found is None:
            return
        pool, inst = found
        del pool.instances[instance_id]
        inst.move(InstanceState.GONE, reason)
        node = self.s.nodes.get(inst.node_id)
        if node is not None:
            node.unreserve(inst.id)
        pool.changed.fire()
        self.s.room.fire()
        self.s.events.emit(kind, f"instance {instance_id} of {pool.name}: {reason}",
                           node_id=inst.node_id, function=pool.name, instance=instance_id)
        await self.s.store.run(self.s.store.end_instance, instance_id, reason)
        log.info("instance gone", instance=instance_id, reason=reason)

    def add(self, pool: FunctionPool, inst: InstanceView) -> None:
        """A started instance joins its pool."""
        pool.instances[inst.id] = inst
        if inst.version != self.s.active.get(inst.function_id, (inst.version, 0.0))[0]:
            # Started for a version switched out meanwhile: it serves the call it was
            # started for (granted right after this, if any), then retires.
            inst.move(InstanceState.STOPPING, "its version was replaced")
            self.s.spawn(self._retire_if_idle(pool, inst))
        pool.changed.fire()

    async def _retire_if_idle(self, pool: FunctionPool, inst: InstanceView) -> None:
        await asyncio.sleep(0)  # after the grant that may follow add()
        if inst.retired:
            await self.stop(pool, inst, "its version was replaced while it started")

    def retire(self, pool: FunctionPool, inst: InstanceView, reason: str) -> None:
        """No request may pick it from now on; it stops now when idle, else when its
        in-flight calls are done (Leasing.release)."""
        idle = inst.idle
        inst.move(InstanceState.STOPPING, reason)
        if idle:
            self.s.spawn(self.stop(pool, inst, reason))

    def retire_old_versions(self, fn: FunctionRecord) -> None:
        pool = self.s.pools.get(fn.id)
        if pool is None:
            return
        for inst in list(pool.instances.values()):
            if inst.version != fn.version and inst.ready:
                self.retire(pool, inst, f"replaced by version {fn.version}")
