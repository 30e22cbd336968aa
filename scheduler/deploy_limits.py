"""What a deploy may ask for beyond the thaw.toml schema (core/spec.py), checked when
the deploy is admitted, before anything is stored or built: limits only the scheduler
knows, the tenant's quota (tenancy.py) and the nodes of the fleet. A refusal is
InvalidArgument (400) naming the thaw.toml key at fault.

- `scaling.min_instances`: the instances kept warm must fit the tenant's instance quota,
  and their slices its slice-memory quota (a warm pool the quota can never hold would
  only ever be refused, start after start);
- `resources.gpu_memory`: no larger than the largest device of a node that could run
  the function (a slice lives on one device);
- `resources.memory`: no larger than the largest node's memory.

With no node registered yet, the node checks are skipped (the build waits for one).
"""

from __future__ import annotations

from collections.abc import Iterable

from thaw.core.errors import InvalidArgument
from thaw.core.spec import FunctionSpec
from thaw.core.units import format_size
from thaw.scheduler.nodes import NodeView
from thaw.scheduler.states import NodeState
from thaw.scheduler.tenancy import TenantRecord


def check_quota(spec: FunctionSpec, quota: TenantRecord | None) -> None:
    """The function's warm pool within the tenant's quota (None: the tenant has none)."""
    if quota is None:
        return
    want = spec.scaling.min_instances
    if quota.max_instances is not None and want > quota.max_instances:
        raise InvalidArgument(
            f"scaling.min_instances is {want}, more than tenant {quota.id}'s quota of "
            f"{quota.max_instances} instances", field="scaling.min_instances")
    need = want * spec.resources.gpu_memory
    if quota.max_memory_bytes is not None and need > quota.max_memory_bytes:
        raise InvalidArgument(
            f"scaling.min_instances = {want} of {format_size(spec.resources.gpu_memory)} "
            f"each need {format_size(need)} of slice memory, more than tenant "
            f"{quota.id}'s quota of {format_size(quota.max_memory_bytes)}",
            field="scaling.min_instances")


def check_fleet(spec: FunctionSpec, nodes: Iterable[NodeView]) -> None:
    """The function's resources within what the largest node offers."""
    live = [n for n in nodes if n.state is not NodeState.LOST
            and n.runs(spec.runtime.image)]
    if not live:
        return
    gpu = spec.resources.gpu_memory
    if gpu > 0:
        largest = max((d.capacity_bytes for n in live for d in n.devices), default=0)
        if gpu > largest:
            raise InvalidArgument(
                f"resources.gpu_memory is {format_size(gpu)}, more than the largest device "
                f"of any node offers ({format_size(largest)})", field="resources.gpu_memory")
    memory = spec.resources.memory
    reported = [n.telemetry.memory_total_bytes for n in live
                if n.telemetry.memory_total_bytes > 0]
    if memory > 0 and reported and memory > max(reported):
        raise InvalidArgument(
            f"resources.memory is {format_size(memory)}, more than the largest node has "
            f"({format_size(max(reported))})", field="resources.memory")
