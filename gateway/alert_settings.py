"""The alerting knobs of GatewaySettings (gateway/config.py mixes this class in).

Kept beside the alerting code so a new rule's threshold is added where the rule is;
the sources are GatewaySettings' own: THAW_ALERTS_<FIELD> env, the [gateway] table of
$THAW_CONFIG, the default. A threshold of 0 turns its rule off.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The rules of gateway/alerts.py, by name (alerts_overrides keys must be one of them;
# a test keeps this list and the rules in step).
ALERT_RULES = ("device_pressure", "pinned_pressure", "queue_depth", "restore_failures",
               "snapshot_quarantined", "node_down", "error_rate", "p99_latency",
               "api_key_expiring")

PressureLevel = Literal["pressure", "critical", "emergency"]


class AlertRuleOptions(BaseModel):
    """Per-rule overrides of the alerting defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    enabled: bool = True
    """False silences the rule altogether."""
    for_seconds: float | None = Field(None, ge=0, alias="for")
    """How long the condition must hold before the alert fires; None = alerts_for."""
    cooldown: float | None = Field(None, ge=0)
    """Least seconds between two FIRING notices of one alert; None = alerts_cooldown."""


def _url_list(value: Any) -> Any:
    # Env values may be a JSON list or plain comma-separated URLs.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class AlertSettings(BaseSettings):
    # The same as GatewayConfig's: a mixin's config is merged into the subclass's.
    model_config = SettingsConfigDict(env_prefix="THAW_", extra="ignore", frozen=True)

    alerts_interval: float = Field(15.0, gt=0, le=3600)
    """Seconds between two evaluations of the alert rules."""
    alerts_cooldown: float = Field(300.0, ge=0)
    """Least seconds between two FIRING notices of the same alert (rule and subject):
    a condition that clears and comes back sooner is not announced again until then."""
    alerts_for: float = Field(0.0, ge=0)
    """Seconds a condition must hold before its alert fires (every rule's default)."""
    alerts_overrides: dict[str, AlertRuleOptions] = Field(default_factory=dict)
    """Per-rule `for`, `cooldown` and `enabled`, by rule name (see README, Alerts)."""
    alerts_webhook_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Generic webhook sinks: each alert transition is POSTed there as JSON."""
    alerts_slack_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Slack-compatible incoming-webhook sinks ({"text", "blocks"} payloads)."""
    alerts_retries: int = Field(4, ge=0, le=20)
    """Retries of a failed delivery (exponential backoff) before it is given up."""
    alerts_timeout: float = Field(5.0, gt=0, le=120)
    """Seconds one delivery attempt may take."""
    alerts_device_pressure: PressureLevel = "critical"
    """Device memory pressure level (per node and device) at which an alert fires."""
    alerts_pinned_pressure: PressureLevel = "critical"
    """Pinned-tier pressure level (per node) at which an alert fires."""
    alerts_queue_depth: int = Field(50, ge=0)
    """Requests of one function waiting in this gateway at which an alert fires; 0 = off."""
    alerts_restore_failures: int = Field(1, ge=0)
    """Failed restores of one function within alerts_event_window that fire; 0 = off."""
    alerts_quarantined: int = Field(1, ge=0)
    """Snapshots of one function quarantined within alerts_event_window that fire; 0 = off."""
    alerts_event_window: float = Field(3600.0, gt=0)
    """Seconds the restore-failure and quarantine counts look back."""
    alerts_heartbeat_age: float = Field(30.0, ge=0)
    """A node whose last heartbeat is older than this (or that is lost) is down; 0 = lost
    only."""
    alerts_error_rate: float = Field(0.05, ge=0, le=1)
    """Share of a function's invocations answered 5xx within alerts_window that fires;
    0 = off."""
    alerts_p99_seconds: float = Field(10.0, ge=0)
    """p99 of a function's invocation latency within alerts_window that fires; 0 = off."""
    alerts_window: float = Field(300.0, gt=0, le=300)
    """Seconds of invocations the error-rate and p99 rules look at; at most the live
    statistics' window (gateway/stats.py WINDOW_SECONDS), which keeps them."""
    alerts_min_requests: int = Field(20, ge=1)
    """Invocations a function needs within alerts_window before its error rate or p99
    is judged (one failed call out of one is not a 100% error rate)."""
    alerts_key_expiry_days: float = Field(7.0, ge=0)
    """An API key expiring within this many days fires; 0 = off."""
    alerts_keys_refresh: float = Field(300.0, gt=0)
    """Seconds between two listings of every tenant's API keys (expiry is judged in days:
    no need to ask often)."""

    @field_validator("alerts_webhook_urls", "alerts_slack_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        return _url_list(value)

    @field_validator("alerts_webhook_urls", "alerts_slack_urls")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{url!r} is not an http(s) URL")
        return value

    @field_validator("alerts_overrides")
    @classmethod
    def _known_rules(cls, value: dict[str, AlertRuleOptions]) -> dict[str, AlertRuleOptions]:
        unknown = sorted(set(value) - set(ALERT_RULES))
        if unknown:
            raise ValueError(f"unknown alert rule {unknown[0]!r}; rules: "
                             f"{', '.join(ALERT_RULES)}")
        return value
