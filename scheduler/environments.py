"""`thaw env ls` and `thaw env gc` across nodes: each node's per-function Python
environments (platform/environments_build.py), listed, or collected first with what
the garbage collector keeps (the kept versions' snapshots, whose manifests name their
environments). docs/environments.md."""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import structlog

from thaw.core.errors import ThawError
from thaw.proto import agent_pb2, scheduler_pb2
from thaw.scheduler.gc import GarbageCollector
from thaw.scheduler.nodes import NodeView
from thaw.scheduler.states import NodeState

log = structlog.get_logger()
# A listing reads each environment's record; a collection removes folders.
NODE_ENVIRONMENTS_TIMEOUT_SECONDS = 600.0
# Why no node collects while a snapshot is built: the build's environment is in no
# kept manifest yet (the node itself keeps what its builds hold, but the keep list
# is only computed outside builds, as garbage collection's is).
BUILDING = "a snapshot build is running: environments are collected after it (retry)"


class EnvironmentsClient(Protocol):
    async def environments(self, request: agent_pb2.EnvironmentsRequest,
                           timeout: float) -> agent_pb2.EnvironmentsResponse: ...


async def node_environments(gc: GarbageCollector, node_id: str, collect: bool
                            ) -> list[scheduler_pb2.NodeEnvironments]:
    """Each target node's environments (`node_id`, or "" for every live node), after
    a collection with `collect`."""
    targets = gc.targets(node_id)
    request = agent_pb2.EnvironmentsRequest(collect=collect)
    if collect:
        kept = await gc.request()
        if kept.skip_chunks:
            return [scheduler_pb2.NodeEnvironments(node_id=n.id, error=BUILDING)
                    for n in targets]
        request.keep.extend(kept.keep)
    return list(await asyncio.gather(*(_on(node, request) for node in targets)))


async def _on(node: NodeView, request: agent_pb2.EnvironmentsRequest
              ) -> scheduler_pb2.NodeEnvironments:
    if node.state is NodeState.LOST:
        return scheduler_pb2.NodeEnvironments(node_id=node.id, error="node is lost")
    try:
        reply = await cast(EnvironmentsClient, node.client).environments(
            request, NODE_ENVIRONMENTS_TIMEOUT_SECONDS)
    except ThawError as exc:
        log.warning("environments not listed", node=node.id, error=str(exc))
        return scheduler_pb2.NodeEnvironments(node_id=node.id, error=exc.message)
    if reply.removed:
        log.info("environments collected", node=node.id, keys=list(reply.removed),
                 freed_bytes=reply.freed_bytes)
    return scheduler_pb2.NodeEnvironments(
        node_id=node.id, environments=reply.environments, removed=reply.removed,
        freed_bytes=reply.freed_bytes)
