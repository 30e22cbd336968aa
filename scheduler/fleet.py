"""The fleet of node agents: registration (adopting or stopping the instances a node
reports), heartbeats, memory pressure readings, lost nodes, cordoning, and which nodes
can run a function. Every node state change goes through states.move."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

import structlog

from thaw.core.errors import FunctionUnavailable, NoCapacity, NotFound
from thaw.proto import scheduler_pb2
from thaw.scheduler.events import EventKind
from thaw.scheduler.instances import Instances
from thaw.scheduler.nodes import DOCKER_RUNTIME, PROCESS_RUNTIME, NodeView
from thaw.scheduler.plane_state import PlaneState
from thaw.scheduler.pools import InstanceView
from thaw.scheduler.pressure import PINNED, Reading, device_resource
from thaw.scheduler.states import FunctionState, NodeState, move
from thaw.scheduler.store import FunctionRecord, InstanceRecord

log = structlog.get_logger()

# How long a deploy waits for a first node when none has registered yet.
NODE_WAIT_SECONDS = 60.0
# Why an image function ([runtime] image) cannot build or start: only nodes with the
# docker runtime run images (README "Deploying a container image").
NO_DOCKER_NODE = ("no node runs the docker runtime; image functions need "
                  "THAW_RUNTIME=docker on at least one node")


def _move(node: NodeView, target: NodeState) -> None:
    move(node, target, f"node {node.id}")


class Fleet:
    def __init__(self, state: PlaneState, instances: Instances) -> None:
        self.s = state
        self.instances = instances

    async def register(self, req: scheduler_pb2.RegisterRequest) -> None:
        """Idempotent: a node id is one node. The same agent registering again changes
        nothing; another agent process under that id (a restart) gets a fresh channel
        (the old one may sit in reconnect backoff and would fail calls to the new
        agent), and the instances it no longer runs are forgotten."""
        s = self.s
        node = s.nodes.get(req.node_id)
        restarted = node is not None and bool(req.boot_id) and node.boot_id != req.boot_id
        if node is not None and (restarted or node.control_address != req.control_address):
            s.spawn(node.client.close())
            node.client = s.agent_client(req.control_address)
            node.control_address = req.control_address
        if node is None:
            node = NodeView(id=req.node_id, control_address=req.control_address,
                            data_url=req.data_url, client=s.agent_client(req.control_address))
        was = node.state
        node.data_url, node.devices = req.data_url, list(req.devices)
        node.runtime = req.runtime or PROCESS_RUNTIME
        node.boot_id = req.boot_id
        self.take_conditions(node, req.conditions)
        _move(node, NodeState.CORDONED if node.cordoned else NodeState.READY)
        node.last_heartbeat = s.clock()
        s.nodes[req.node_id] = node
        await s.store.run(s.store.upsert_node, req.node_id, req.control_address,
                          req.data_url, json.dumps([d.id for d in req.devices]))
        if node.state is not NodeState.READY:  # the upsert wrote "ready"
            await s.store.run(s.store.set_node_state, node.id, node.state.value)
        await self._reconcile_reported(node, set(req.instance_ids))
        node.take_report(list(req.devices))
        self.observe_pressure(node)
        s.nodes_changed.set()
        s.room.fire()
        how = ("re-registered: its agent restarted" if restarted
               else f"registered (was {was.value})" if was is NodeState.LOST else "registered")
        s.events.emit(EventKind.NODE_REGISTERED, f"node {node.id} {how}",
                      node_id=node.id, devices=len(req.devices),
                      instances=len(req.instance_ids), runtime=node.runtime,
                      restarted=str(restarted).lower())
        log.info("node registered", node=req.node_id, data_url=req.data_url,
                 devices=len(req.devices), instances=len(req.instance_ids),
                 runtime=node.runtime, restarted=restarted)

    async def stopping(self, node: NodeView) -> None:
        """The node's agent is shutting down (SIGTERM: a restart, or a node going
        away): no new work goes there, its instances are forgotten now (the agent stops
        them after its drain), and the node is RESTARTING until its agent registers
        again; reconcile writes it off as lost after node_timeout without a word."""
        if node.state is NodeState.RESTARTING:
            return
        _move(node, NodeState.RESTARTING)
        await self.s.store.run(self.s.store.set_node_state, node.id, node.state.value)
        for inst in self.s.instances_on(node.id):
            await self.instances.forget(inst.id, f"its agent on node {node.id} is stopping")
        self.s.nodes_changed.set()
        self.s.events.emit(EventKind.NODE_REGISTERED,
                           f"node {node.id} restarting: its agent is stopping",
                           node_id=node.id, state=NodeState.RESTARTING.value)
        log.warning("node restarting", node=node.id)

    async def _reconcile_reported(self, node: NodeView, reported: set[str]) -> None:
        """Match the instances a (re-)registering node runs with what the scheduler
        knows: adopt those the DB still has as live for the function's current
        version (the scheduler restarted), stop the others rather than leak them,
        and forget the ones the node no longer runs (the agent restarted)."""
        s = self.s
        known = {i.id for i in s.instances_on(node.id)}
        for instance_id in sorted(known - reported):
            await self.instances.forget(instance_id, "its node no longer runs it")
        adopted: dict[str, int] = {}
        functions: dict[str, FunctionRecord | None] = {}
        for instance_id in sorted(reported - known - node.starting_ids):
            record = s.unclaimed.pop(instance_id, None)
            fn = None
            if record is not None and record.node_id == node.id:
                if record.function_id not in functions:
                    try:
                        functions[record.function_id] = await s.store.run(
                            s.store.get_function_by_id, record.function_id)
                    except NotFound:
                        functions[record.function_id] = None
                fn = functions[record.function_id]
            if (record is not None and fn is not None and fn.state is FunctionState.READY
                    and fn.version == record.version and record.node_id == node.id):
                self._adopt(node, fn, record)
                adopted[instance_id] = fn.spec.resources.gpu_memory
                continue
            if record is None or record.node_id != node.id:
                why = "unknown to the scheduler"
            elif fn is None:
                why = "its function no longer exists"
            elif fn.state is not FunctionState.READY:
                why = f"its function is {fn.state.value}"
            else:
                why = "its function changed version"
            s.spawn(self.instances.stop_quietly(node, instance_id, why))
            await s.store.run(s.store.end_instance, instance_id, f"orphaned: {why}")
            log.info("stopping unknown instance", node=node.id, instance=instance_id,
                     reason=why)
        node.adopt_slices(adopted)

    def _adopt(self, node: NodeView, fn: FunctionRecord, record: InstanceRecord) -> None:
        pool = self.s.pool(fn)
        inst = InstanceView(id=record.id, function_id=fn.id, version=record.version,
                            node_id=node.id, start=record.start_kind,
                            gpu_memory=fn.spec.resources.gpu_memory,
                            last_used=self.s.clock())
        pool.instances[inst.id] = inst
        pool.changed.fire()
        self.s.events.emit(EventKind.INSTANCE_ADOPTED,
                           f"instance {inst.id} of {pool.name} adopted after a restart",
                           node_id=node.id, function=pool.name, instance=inst.id)
        log.info("instance adopted", instance=inst.id, function=pool.name, node=node.id)

    async def heartbeat(self, req: scheduler_pb2.HeartbeatRequest) -> bool:
        """Returns False when the node must register again."""
        s = self.s
        node = s.nodes.get(req.node_id)
        if node is None or (req.boot_id and node.boot_id and req.boot_id != node.boot_id):
            return False  # unknown, or an agent process other than the one registered
        node.last_heartbeat = s.clock()
        if req.stopping:
            await self.stopping(node)
            return True
        if node.state is NodeState.RESTARTING:
            return False  # its agent changed its mind: it registers again
        node.take_report(list(req.devices))
        node.pinned = req.pinned
        node.disk_bytes = req.disk_bytes
        node.telemetry = req.telemetry
        self.take_conditions(node, req.conditions)
        if node.state is NodeState.LOST:
            _move(node, NodeState.CORDONED if node.cordoned else NodeState.READY)
            await s.store.run(s.store.set_node_state, node.id, node.state.value)
            # Its instances were written off when it was lost: stop what still runs.
            known = {i.id for p in s.pools.values() for i in p.instances.values()}
            for instance_id in set(req.instance_ids) - known - node.starting_ids:
                s.spawn(self.instances.stop_quietly(node, instance_id, "its node was lost"))
            s.nodes_changed.set()
            s.events.emit(EventKind.NODE_RECOVERED, f"node {node.id} is back",
                          node_id=node.id)
            log.warning("node recovered", node=node.id)
        for exited in req.exited:
            await self.instances.forget(exited.instance_id, f"exited: {exited.reason}")
        for repaired in req.repaired:
            s.events.emit(EventKind.CHUNK_REPAIRED, repaired, node_id=node.id,
                          how="fetched again")
            log.warning("corrupt chunk repaired", node=node.id, what=repaired)
        self.observe_pressure(node)
        s.room.fire()
        return True

    def take_conditions(self, node: NodeView,
                        conditions: Iterable[scheduler_pb2.NodeCondition]) -> None:
        """The node's storage conditions as reported; a change is an event (a full or
        read-only data directory, or all clear again)."""
        new = list(conditions)
        before = {(c.type, c.path) for c in node.conditions}
        node.conditions = new
        if {(c.type, c.path) for c in new} == before:
            return
        for c in new:
            if (c.type, c.path) not in before:
                message = f"node {node.id}: {c.path} is {c.type.replace('_', '-')} ({c.message})"
                self.s.events.emit(EventKind.NODE_CONDITION, message, node_id=node.id,
                                   condition=c.type, path=c.path)
                log.error("node storage condition", node=node.id, condition=c.type,
                          path=c.path, detail=c.message)
        if not new:
            self.s.events.emit(EventKind.NODE_CONDITION,
                               f"node {node.id}: storage is writable again",
                               node_id=node.id, condition="ok")
            log.warning("node storage writable again", node=node.id)

    def observe_pressure(self, node: NodeView) -> None:
        readings = [Reading(device_resource(d.id), used, d.capacity_bytes)
                    for d, used in zip(node.devices, node.device_used(), strict=True)]
        readings.append(Reading(PINNED, node.pinned.used_bytes, node.pinned.capacity_bytes))
        for change in self.s.pressure.observe(node.id, readings):
            worse = change.level > change.previous
            message = (f"{change.resource} of node {node.id} is {change.level.label} "
                       f"({change.used_fraction:.0%} used, was {change.previous.label})")
            self.s.events.emit(EventKind.PRESSURE, message, node_id=node.id,
                               resource=change.resource, level=change.level.label,
                               previous=change.previous.label,
                               used_fraction=f"{change.used_fraction:.4f}")
            (log.warning if worse else log.info)("memory pressure", node=node.id,
                                                 resource=change.resource,
                                                 level=change.level.label,
                                                 used=round(change.used_fraction, 4))

    def check_runtime(self, fn: FunctionRecord) -> None:
        """FunctionUnavailable (503) now, rather than a wait for room that cannot
        come, when an image function has no ready docker node to run on."""
        if not fn.spec.runtime.image or self.s.runnable_nodes(fn):
            return
        docker = sorted((n for n in self.s.nodes.values() if n.runtime == DOCKER_RUNTIME),
                        key=lambda n: n.id)
        if not docker:
            raise FunctionUnavailable(NO_DOCKER_NODE)
        states = ", ".join(f"{n.id} {n.state.value}" for n in docker)
        raise FunctionUnavailable(f"no docker node is ready ({states}); image functions "
                                  "run only on nodes with THAW_RUNTIME=docker")

    @staticmethod
    def image_missing(fn: FunctionRecord, lacking: dict[str, str]) -> FunctionUnavailable:
        """Every ready docker node refused for lack of the image (node id -> its error)."""
        if len(lacking) == 1:
            return FunctionUnavailable(next(iter(lacking.values())))
        return FunctionUnavailable(
            f"image {fn.spec.runtime.image} is on no docker node's engine (tried "
            f"{', '.join(lacking)}; nothing is pulled: `docker load` it on one)")

    async def wait_for_node(self) -> None:
        s = self.s
        deadline = s.clock() + NODE_WAIT_SECONDS
        while not s.ready_nodes():
            s.nodes_changed.clear()
            remaining = deadline - s.clock()
            if remaining <= 0:
                raise NoCapacity("no node agent is registered with the scheduler")
            try:
                await asyncio.wait_for(s.nodes_changed.wait(), remaining)
            except TimeoutError:
                continue

    async def mark_lost(self, node: NodeView, reason: str) -> None:
        """Write the node off: its instances are gone, new work goes elsewhere."""
        if node.state is NodeState.LOST:
            return
        if (node.state is NodeState.RESTARTING
                and self.heartbeat_age(node) <= self.s.timeouts.node_timeout):
            # Said it restarts: reconcile writes it off if it does not come back.
            log.info("restarting node not written off", node=node.id, reason=reason)
            return
        _move(node, NodeState.LOST)
        self.s.pressure.forget(node.id)
        log.error("node lost", node=node.id, reason=reason)
        self.s.events.emit(EventKind.NODE_LOST, f"node {node.id} lost: {reason}",
                           node_id=node.id)
        for inst in self.s.instances_on(node.id):
            await self.instances.forget(inst.id, f"node {node.id} lost")
        node.slices.clear()
        await self.s.store.run(self.s.store.set_node_state, node.id, NodeState.LOST.value)

    async def probe(self, node: NodeView, why: str) -> None:
        """A call to the node failed: if its agent no longer answers, it is lost now
        rather than after node_timeout."""
        if node.id in self.s.probing or node.state in (NodeState.LOST,
                                                        NodeState.RESTARTING):
            return
        self.s.probing.add(node.id)
        try:
            if not await node.client.alive():
                await self.mark_lost(node, f"its agent stopped answering ({why})")
        finally:
            self.s.probing.discard(node.id)

    def heartbeat_age(self, node: NodeView) -> float:
        return max(0.0, self.s.clock() - node.last_heartbeat)

    async def cordon(self, node_id: str, cordoned: bool) -> NodeView:
        node = self.s.nodes.get(node_id)
        if node is None:
            raise NotFound(f"no node {node_id!r}", field="node_id")
        node.cordoned = cordoned
        if node.state not in (NodeState.LOST, NodeState.RESTARTING):
            target = NodeState.CORDONED if cordoned else NodeState.READY
            _move(node, target)
            await self.s.store.run(self.s.store.set_node_state, node.id, target.value)
        if not cordoned:
            self.s.room.fire()
        log.info("node cordoned" if cordoned else "node uncordoned", node=node_id)
        return node

    def node_instances(self, node_id: str) -> int:
        return len(self.s.instances_on(node_id))
