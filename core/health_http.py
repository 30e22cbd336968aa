"""Liveness and readiness over plain HTTP, for the probes of an orchestrator
(the kubelet's httpGet) that cannot speak the mutual-TLS gRPC port.

- `GET /livez`: 200 while the process's event loop answers; it checks nothing else,
  so a dependency that is down never gets a healthy process restarted;
- `GET /readyz`: 200 when the component's gRPC health service says SERVING (the
  state `core/grpcutil.mark_serving` sets) and every check of the component passes
  (the scheduler: its database answers; an agent: it is registered with the
  scheduler), else 503 with the reasons.

The listener binds loopback unless its setting names another host (`PORT` alone is
127.0.0.1:PORT); it serves nothing but these two paths.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn

from aiohttp import web
from grpc_health.v1 import health, health_pb2

# A check answers None when fine, else why the component cannot serve.
Check = Callable[[], Awaitable[str | None]]
# A check that takes longer than this counts as failed (a probe must not hang).
CHECK_TIMEOUT_SECONDS = 5.0
LOOPBACK = "127.0.0.1"


def split_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `port` (loopback) -> (host, port)."""
    host, _, port = listen.rpartition(":")
    return (host.strip("[]") or LOOPBACK), int(port)


class _NoContext:
    """Stands in for a gRPC context when the health servicer is asked in process."""

    async def abort(self, code: Any, details: str = "") -> NoReturn:
        raise LookupError(details or str(code))


async def grpc_serving(servicer: health.aio.HealthServicer) -> str | None:
    """None when the server's overall health status is SERVING, else the status."""
    try:
        reply = await servicer.Check(health_pb2.HealthCheckRequest(service=""),
                                     _NoContext())
    except LookupError:
        return "the gRPC server has not started serving"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return ("the gRPC server is "
                f"{health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return None


class HealthServer:
    """The /livez and /readyz listener of one component."""

    def __init__(self, component: str, grpc_health: health.aio.HealthServicer | None,
                 checks: Mapping[str, Check] | None = None) -> None:
        self.component = component
        self.port = 0
        self._grpc_health = grpc_health
        self._checks = dict(checks or {})
        self._runner: web.AppRunner | None = None

    async def reasons(self) -> dict[str, str]:
        """Why the component cannot serve now, by check; empty when it can."""
        out: dict[str, str] = {}
        if self._grpc_health is not None:
            reason = await grpc_serving(self._grpc_health)
            if reason is not None:
                out["grpc"] = reason
        for name, check in self._checks.items():
            try:
                reason = await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
            except TimeoutError:
                reason = f"no answer within {CHECK_TIMEOUT_SECONDS:.0f}s"
            except Exception as exc:  # noqa: BLE001 - a failing check means not ready
                reason = f"{type(exc).__name__}: {exc}"
            if reason is not None:
                out[name] = reason
        return out

    async def _livez(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "component": self.component})

    async def _readyz(self, request: web.Request) -> web.Response:
        reasons = await self.reasons()
        if reasons:
            return web.json_response({"status": "not_ready", "component": self.component,
                                      "reasons": reasons}, status=503)
        return web.json_response({"status": "ready", "component": self.component})

    async def start(self, listen: str) -> int:
        """Serve on `listen` (`host:port` or `port`; port 0 = any free one)."""
        host, port = split_listen(listen)
        app = web.Application()
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
