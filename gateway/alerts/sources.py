"""Where the alert engine's view comes from: the `AlertSources` protocol and the running
gateway's `LiveSources` (its scheduler client, queues, live statistics and the tenancy
service's keys)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from thaw.core.errors import ThawError
from thaw.core.grpcutil import call
from thaw.gateway.alerts.view import CallFigures, KeyExpiry
from thaw.gateway.state import Gateway
from thaw.gateway.stats import FunctionStats, percentile
from thaw.proto import scheduler_pb2, tenancy_pb2, tenancy_pb2_grpc

# Events read per ListEvents call while catching up.
EVENTS_PAGE = 1000


class AlertSources(Protocol):
    """What the engine reads; each raises ThawError when it cannot."""

    key_source: str
    """Where API keys come from (reported by GET /v1/alerts)."""

    async def nodes(self) -> Sequence[scheduler_pb2.NodeInfo]: ...

    def queue_depths(self) -> Mapping[str, int]: ...

    async def events(self, after_seq: int, kinds: Sequence[str]
                     ) -> tuple[int, Sequence[scheduler_pb2.Event]]:
        """(the scheduler's last seq, events after `after_seq` of these kinds, at most
        EVENTS_PAGE)."""
        ...

    def calls(self, window: float, now: float) -> Mapping[str, CallFigures]: ...

    async def api_keys(self) -> Sequence[KeyExpiry]: ...


class LiveSources:
    """The running gateway's: its scheduler client, queues and live statistics."""

    def __init__(self, gw: Gateway, stats: Callable[[], FunctionStats | None],
                 keys_refresh: float) -> None:
        self._gw = gw
        self._stats = stats
        self._keys_refresh = keys_refresh
        self.key_source = "tenancy"
        self._keys: list[KeyExpiry] = []
        self._keys_read_at: float | None = None

    async def nodes(self) -> Sequence[scheduler_pb2.NodeInfo]:
        nodes: Sequence[scheduler_pb2.NodeInfo] = await self._gw.scheduler.list_nodes()
        return nodes

    def queue_depths(self) -> Mapping[str, int]:
        return dict(self._gw.dispatcher.queues.depth)

    async def events(self, after_seq: int, kinds: Sequence[str]
                     ) -> tuple[int, Sequence[scheduler_pb2.Event]]:
        reply = await self._gw.scheduler.list_events(after_seq, EVENTS_PAGE, list(kinds))
        return reply.last_seq, list(reply.events)

    def calls(self, window: float, now: float) -> Mapping[str, CallFigures]:
        stats = self._stats()
        if stats is None:
            return {}
        out = {}
        for function in stats.functions():
            recent = [c for c in stats.recent([function], limit=10**9)
                      if c.time >= now - window]
            if recent:
                latencies = sorted(c.ms / 1000 for c in recent)
                out[function] = CallFigures(len(recent), sum(1 for c in recent if c.error),
                                            percentile(latencies, 0.99))
        return out

    async def api_keys(self) -> Sequence[KeyExpiry]:
        now = time.monotonic()
        if self._keys_read_at is not None and now - self._keys_read_at < self._keys_refresh:
            return self._keys
        try:
            keys = await self._list_keys()
        except ThawError as exc:
            self.key_source = f"unavailable: {exc.message}"
            raise
        self.key_source = "tenancy"
        self._keys, self._keys_read_at = keys, now
        return keys

    async def _list_keys(self) -> list[KeyExpiry]:
        # The generated stub's constructor is untyped; the stub itself is used as Any.
        make_stub: Callable[[Any], Any] = tenancy_pb2_grpc.TenancyStub
        stub = make_stub(self._gw.scheduler.channel)
        tenants = await call(stub.ListTenants(tenancy_pb2.ListTenantsRequest(), timeout=30))
        keys: list[KeyExpiry] = []
        for tenant in tenants.tenants:
            listed = await call(stub.ListKeys(tenancy_pb2.ListKeysRequest(tenant=tenant.id),
                                              timeout=30))
            keys.extend(KeyExpiry(k.id, k.tenant, k.name, k.expires_at)
                        for k in listed.keys if not k.revoked_at and k.expires_at)
        return keys
