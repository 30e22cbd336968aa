"""Alerting wired into the gateway app: the engine and sinks started and stopped with
the app (cleanup_ctx), and GET /v1/alerts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Gauge

from thaw.core.config_alerts import AlertFields
from thaw.core.errors import Unavailable
from thaw.gateway.alert_email import EmailTransport, SmtpOptions
from thaw.gateway.alert_pagerduty import PagerDutyTransport
from thaw.gateway.alert_sinks import SinkMetrics, Sinks, Transport
from thaw.gateway.alerts.engine import AlertEngine
from thaw.gateway.alerts.rules import rules_from_settings
from thaw.gateway.alerts.sources import LiveSources
from thaw.gateway.auth import require_operator
from thaw.gateway.caller import principal_of
from thaw.gateway.openapi import _errors, _json
from thaw.gateway.state import CONFIG_KEY, GATEWAY_KEY, METRICS_KEY
from thaw.gateway.stats import STATS_KEY, FunctionStats

# How long shutdown waits for notices still in the sinks' outboxes.
SINKS_CLOSE_GRACE_SECONDS = 5.0


@dataclass
class Alerting:
    """The app's alerting; its engine exists while the app runs."""

    engine: AlertEngine | None = None


ALERTING_KEY = web.AppKey("alerting", Alerting)


def sinks_from_settings(config: AlertFields, session: aiohttp.ClientSession,
                        metrics: SinkMetrics, **backoff: float) -> Sinks:
    """Every sink the settings name: webhooks (signed with alerts_webhook_signing_key when
    set), Slack webhooks, a PagerDuty service per routing key, and e-mail."""
    source = f"thaw-gateway@{socket.gethostname()}"
    others: list[Transport] = [
        PagerDutyTransport(key.get_secret_value(), session, config.alerts_timeout, source,
                           config.alerts_pagerduty_url, i)
        for i, key in enumerate(config.alerts_pagerduty_routing_keys, 1)]
    if config.alerts_smtp_host:
        others.append(EmailTransport(SmtpOptions(
            config.alerts_smtp_host, config.alerts_smtp_port, config.alerts_smtp_from,
            tuple(config.alerts_smtp_to), config.alerts_smtp_security,
            config.alerts_smtp_username, config.alerts_smtp_password.get_secret_value(),
            config.alerts_timeout)))
    return Sinks.build(session, metrics, config.alerts_webhook_urls,
                       config.alerts_slack_urls, config.alerts_retries,
                       config.alerts_timeout,
                       webhook_secret=config.alerts_webhook_signing_key.get_secret_value(),
                       others=others, **backoff)


async def _alerting(app: web.Application) -> AsyncIterator[None]:
    config, gw = app[CONFIG_KEY], app[GATEWAY_KEY]
    firing = Gauge("thaw_alerts_firing", "Alerts firing now, by rule", ["alert"],
                   registry=app[METRICS_KEY].registry)
    session = aiohttp.ClientSession()
    sinks = sinks_from_settings(config, session, SinkMetrics(app[METRICS_KEY].registry))
    engine = AlertEngine(rules_from_settings(config),
                         LiveSources(gw, lambda: app.get(STATS_KEY),
                                     config.alerts_keys_refresh), sinks.notify,
                         firing_gauge=firing)
    app[ALERTING_KEY].engine = engine
    sinks.start()
    loop_task = asyncio.get_running_loop().create_task(
        engine.run_forever(config.alerts_interval))
    yield
    loop_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop_task
    app[ALERTING_KEY].engine = None
    await sinks.close(SINKS_CLOSE_GRACE_SECONDS)
    await session.close()


async def list_alerts(request: web.Request) -> web.Response:
    """Active alerts (pending, firing, held by a cooldown) and the latest transitions."""
    gw = request.app[GATEWAY_KEY]
    require_operator(await principal_of(request),
                     gw.config)
    engine = request.app[ALERTING_KEY].engine
    if engine is None:
        raise Unavailable("alerting is not running")
    return web.json_response(engine.to_json())


def add_routes(app: web.Application) -> None:
    if STATS_KEY not in app:
        # Until (or without) the dashboard module: the live statistics the error-rate
        # and latency rules read (the dashboard's add_routes installs its own).
        app[STATS_KEY] = FunctionStats()
    app[ALERTING_KEY] = Alerting()
    app.cleanup_ctx.append(_alerting)
    app.router.add_get("/v1/alerts", list_alerts)


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/alerts": {"get": {
        "summary": "Alerts: the rules, active alerts and recent transitions (operator)",
        "responses": {
            "200": _json({"type": "object", "required": ["rules", "active", "recent"],
                          "properties": {
                              "rules": {"type": "array", "items": {"type": "object"}},
                              "active": {"type": "array", "items": {"type": "object"}},
                              "recent": {"type": "array", "items": {"type": "object"}},
                              "api_keys_source": {"type": "string"}}},
                         "Alerts."),
            **_errors(401, 403)}}},
}
