"""The scheduler's Prometheus metrics, served when metrics_listen is set."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.tls import platform_identity
from thaw.core.config import SchedulerConfig
from thaw.scheduler.server import SchedulerServer


async def test_metrics_listen_serves_restore_failures_and_events(tmp_path: Path) -> None:
    server = SchedulerServer(SchedulerConfig(home=tmp_path, scheduler_listen="127.0.0.1:0",
                                             metrics_listen="127.0.0.1:0"))
    platform_identity(tmp_path, "scheduler")  # the certificates `thaw up` would make
    await server.start()
    try:
        assert server.metrics_port > 0
        async with httpx.AsyncClient() as client:
            resp = await client.get(f"http://127.0.0.1:{server.metrics_port}/metrics")
        assert resp.status_code == 200
        assert "# TYPE thaw_restore_failures_total counter" in resp.text
        assert "# TYPE thaw_scheduler_events_total counter" in resp.text
    finally:
        await server.stop()
    assert server._metrics is None


async def test_no_metrics_server_by_default(tmp_path: Path) -> None:
    server = SchedulerServer(SchedulerConfig(home=tmp_path, scheduler_listen="127.0.0.1:0"))
    platform_identity(tmp_path, "scheduler")
    await server.start()
    try:
        assert server.metrics_port == 0 and server._metrics is None
    finally:
        await server.stop()
