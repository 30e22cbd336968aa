"""JSON views of the scheduler's records as the management API shows them (functions,
versions, nodes), shared by the routes that answer with them."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from thaw.core.schedule_spec import Schedule
from thaw.gateway.fnconfig import config_of
from thaw.gateway.origins import function_base_url
from thaw.gateway.state import CONFIG_KEY
from thaw.proto import scheduler_pb2


def function_url(request: web.Request, tenant: str, name: str) -> str:
    """On the function origin (gateway/origins.py)."""
    base = function_base_url(request, request.app[CONFIG_KEY].public_url)
    return f"{base}/fn/{tenant}/{name}"


def function_json(request: web.Request, fn: scheduler_pb2.FunctionInfo) -> dict[str, Any]:
    return {
        "name": fn.name, "tenant": fn.tenant, "version": fn.version, "state": fn.state,
        "reason": fn.reason, "start_mode": fn.start_mode, "handler": fn.handler,
        "bundle_digest": fn.bundle_digest, "snapshot_bytes": fn.snapshot_bytes,
        "warm_instances": fn.warm_instances, "config": config_of(fn.config_json).document,
        "created_at": fn.created_at, "updated_at": fn.updated_at,
        "active_version": fn.active_version or None,
        "latest_build": version_json(fn.latest_build) if fn.HasField("latest_build") else None,
        "url": function_url(request, fn.tenant, fn.name), "priority": fn.priority or None,
        "gpu_compute_unenforced_nodes": list(fn.gpu_compute_unenforced_nodes),
        "warnings": compute_warnings(fn),
        "schedules": schedules_json(config_of(fn.config_json).document),
        **build_step_json(fn.latest_build),
    }


def schedules_json(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The serving version's cron schedules (docs/schedules.md), each with its next due
    time (Unix seconds; null when disabled)."""
    now = time.time()
    shown = []
    for entry in document.get("schedules") or ():
        sched = Schedule.from_dict(entry)
        shown.append({"cron": sched.cron, "timezone": sched.timezone,
                      "enabled": sched.enabled, "input": sched.input,
                      "next_run_at": sched.next_after(now) if sched.enabled else None})
    return shown


def build_step_json(v: scheduler_pb2.VersionInfo) -> dict[str, Any]:
    """The build's current step while the version builds: `build_step` (text, null when
    none is known) and `build_progress` (0..1, null when the step has no measure)."""
    return {"build_step": v.build_step or None,
            "build_progress": (round(v.build_progress, 4) if v.HasField("build_progress")
                               else None)}


# What the function status and `thaw node ls` say where a gpu_compute share has no MPS
# daemon to apply it (the instance then competes for every SM of its GPU).
GPU_COMPUTE_NOT_ENFORCED = "gpu_compute not enforced"


def compute_warnings(fn: scheduler_pb2.FunctionInfo) -> list[str]:
    """Warnings about a function's configuration as the nodes would run it."""
    nodes = list(fn.gpu_compute_unenforced_nodes)
    if not nodes:
        return []
    return [f"{GPU_COMPUTE_NOT_ENFORCED} on {', '.join(nodes)}: no MPS daemon runs there, "
            "so its instances may use every SM of their GPU"]


def version_json(v: scheduler_pb2.VersionInfo) -> dict[str, Any]:
    return {
        "version": v.version, "state": v.state, "reason": v.reason, "active": v.active,
        "bundle_digest": v.bundle_digest, "handler": v.handler, "start_mode": v.start_mode,
        "snapshot": v.snapshot_state or None, "snapshot_bytes": v.snapshot_bytes,
        "created_at": v.created_at, "activated_at": v.activated_at or None,
        "config": config_of(v.config_json).document,
        **build_step_json(v),
    }


def node_json(node: scheduler_pb2.NodeInfo) -> dict[str, Any]:
    return {
        "id": node.id, "state": node.state, "instances": node.instances,
        "runtime": node.runtime or "process",
        "mps_active": node.telemetry.mps_active,
        "data_url": node.data_url, "disk_bytes": node.disk_bytes,
        "last_heartbeat_age_seconds": round(node.last_heartbeat_age_seconds, 3),
        "devices": [{"id": d.id, "kind": d.kind, "capacity_bytes": d.capacity_bytes,
                     "used_bytes": d.used_bytes} for d in node.devices],
        "pinned": {"capacity_bytes": node.pinned.capacity_bytes,
                   "used_bytes": node.pinned.used_bytes, "chunks": node.pinned.chunks,
                   "snapshots": len(node.pinned.snapshot_keys),
                   # "" from an agent that does not report it: locked unknown.
                   "lock": node.pinned.lock, "lock_refusal": node.pinned.lock_refusal,
                   "dead_bytes": node.pinned.dead_bytes},
        "pressure": node.pressure or "normal",
        "conditions": [{"type": c.type, "path": c.path, "message": c.message,
                        "free_bytes": c.free_bytes, "total_bytes": c.total_bytes}
                       for c in node.conditions],
        "pressures": [{"resource": p.resource, "level": p.level,
                       "used_fraction": round(p.used_fraction, 4)} for p in node.pressures],
        "telemetry": {
            "cpu_percent": node.telemetry.cpu_percent,
            "memory_used_bytes": node.telemetry.memory_used_bytes,
            "memory_total_bytes": node.telemetry.memory_total_bytes,
            "instances": [{"id": i.instance_id, "function": i.function,
                           "rss_bytes": i.rss_bytes, "unique_bytes": i.unique_bytes,
                           "cpu_percent": i.cpu_percent} for i in node.telemetry.instances],
        },
    }
