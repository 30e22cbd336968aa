"""The gateway's components, built once per app on its event loop (see app.py)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from thaw.gateway.auth import Authenticator
from thaw.gateway.config import GatewaySettings
from thaw.gateway.dispatch import Dispatcher
from thaw.gateway.leases import LeasePool
from thaw.gateway.metrics import GatewayMetrics
from thaw.gateway.nodeclient import NodeClient
from thaw.gateway.ratelimit import KeyRateLimiter
from thaw.gateway.scheduler_client import SchedulerClient
from thaw.proto import scheduler_pb2


@dataclass
class Gateway:
    config: GatewaySettings
    metrics: GatewayMetrics
    scheduler: SchedulerClient
    nodes: NodeClient
    auth: Authenticator
    limiter: KeyRateLimiter
    leases: LeasePool
    dispatcher: Dispatcher


CONFIG_KEY = web.AppKey("config", GatewaySettings)
METRICS_KEY = web.AppKey("metrics", GatewayMetrics)
GATEWAY_KEY = web.AppKey("gateway", Gateway)

# What a request learns on its way, for the middleware's log line and metrics.
RECEIVED_KEY = web.RequestKey("received", float)
"""Loop time the request arrived (deadlines count from it)."""
REQUEST_ID_KEY = web.RequestKey("request_id", str)
PRINCIPAL_KEY = web.RequestKey("principal", scheduler_pb2.Principal)
FUNCTION_KEY = web.RequestKey("function", str)
"""tenant/name of the function invoked."""
START_KEY = web.RequestKey("start", str)
"""warm | restore | fresh, once an instance is leased."""
ERROR_CODE_KEY = web.RequestKey("error_code", str)
"""The code of an error sent inside a stream (the status was 200 by then)."""
TENANT_ERROR_KEY = web.RequestKey("tenant_error", bool)
"""The answer is an error the handler chose (X-Thaw-Error: tenant): counted by its
status, never as a failure of the function (gateway/stats.py, the alerts)."""
