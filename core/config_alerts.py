"""The gateway's alerting settings: the rules' thresholds and per-rule overrides
(gateway/alerts/) and the sinks (gateway/alert_sinks.py, alert_pagerduty.py,
alert_email.py; docs/alerts.md). core/config.py composes AlertFields into the
gateway's settings with the fields of core/config_fields.py."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The alert rules of gateway/alerts, by name (alerts_overrides keys must be one of
# them; the rules' module asserts that its table matches).
ALERT_RULES = ("device_pressure", "pinned_pressure", "queue_depth", "restore_failures",
               "snapshot_quarantined", "node_down", "error_rate", "p99_latency",
               "api_key_expiring", "node_storage")

PressureLevel = Literal["pressure", "critical", "emergency"]

# Webhook URLs are secrets: `thaw config show` hides their paths (core/config.py).
_URL_SECRET: dict[str, Any] = {"secret": "url"}


def url_list(value: Any) -> Any:
    """A list setting from the environment: a JSON list or plain comma-separated values."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class AlertRuleOptions(BaseModel):
    """Per-rule overrides of the alerting defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              use_attribute_docstrings=True)

    enabled: bool = True
    """False silences the rule altogether."""
    for_seconds: float | None = Field(None, ge=0, alias="for")
    """How long the condition must hold before the alert fires; None = alerts_for."""
    cooldown: float | None = Field(None, ge=0)
    """Least seconds between two FIRING notices of one alert; None = alerts_cooldown."""


class AlertFields(BaseSettings):
    # The same config as core/config_fields.py's _Fields (the composed classes' own).
    model_config = SettingsConfigDict(env_prefix="THAW_", extra="ignore", frozen=True,
                                      use_attribute_docstrings=True)

    # A threshold of 0 turns its rule off.
    alerts_interval: float = Field(15.0, gt=0, le=3600)
    """Seconds between two evaluations of the alert rules."""
    alerts_cooldown: float = Field(300.0, ge=0)
    # A condition that clears and comes back sooner is not announced again until then.
    """Least seconds between two FIRING notices of one alert (rule and subject)."""
    alerts_for: float = Field(0.0, ge=0)
    """Seconds a condition must hold before its alert fires (every rule's default)."""
    alerts_overrides: dict[str, AlertRuleOptions] = Field(default_factory=dict)
    """Per-rule `for`, `cooldown` and `enabled`, by rule name (see README, Alerts)."""
    alerts_webhook_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, json_schema_extra=_URL_SECRET)
    """Generic webhook sinks: each alert transition is POSTed there as JSON."""
    alerts_slack_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, json_schema_extra=_URL_SECRET)
    """Slack-compatible incoming-webhook sinks ({"text", "blocks"} payloads)."""
    alerts_webhook_signing_key: SecretStr = SecretStr("")
    """whsec_<base64>: the generic webhooks' notices are signed (Standard Webhooks)."""
    alerts_pagerduty_routing_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list)
    """PagerDuty Events API v2 routing keys: an alert triggers, then resolves, an incident."""
    alerts_pagerduty_url: str = "https://events.pagerduty.com/v2/enqueue"
    """Where PagerDuty events are POSTed (PagerDuty's public endpoint, or a proxy)."""
    alerts_smtp_host: str = ""
    """SMTP relay of the e-mail sink; "" = no e-mail."""
    alerts_smtp_port: int = Field(587, gt=0, lt=65536)
    """The relay's port: 587 for starttls, 465 for tls."""
    alerts_smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    """starttls (upgrade, refused without it), tls (implicit, port 465) or none."""
    alerts_smtp_username: str = ""
    """Login at the relay; "" = none."""
    alerts_smtp_password: SecretStr = SecretStr("")
    """The login's password (never shown)."""
    alerts_smtp_from: str = ""
    """The e-mail sink's From address."""
    alerts_smtp_to: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Recipients of the e-mail sink (a JSON list or comma-separated addresses)."""
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
    """Heartbeat age in seconds past which a node is down (lost is); 0 = lost only."""
    alerts_error_rate: float = Field(0.05, ge=0, le=1)
    """Share of a function's calls answered 5xx within alerts_window that fires; 0 = off."""
    alerts_p99_seconds: float = Field(10.0, ge=0)
    """p99 of a function's invocation latency within alerts_window that fires; 0 = off."""
    alerts_window: float = Field(300.0, gt=0, le=300)
    # At most the live statistics' window (gateway/stats.py WINDOW_SECONDS), which keeps them.
    """Seconds of invocations the error-rate and p99 rules look at."""
    alerts_min_requests: int = Field(20, ge=1)
    # One failed call out of one is not a 100% error rate.
    """Calls a function needs within alerts_window before its error rate or p99 is judged."""
    alerts_key_expiry_days: float = Field(7.0, ge=0)
    """An API key expiring within this many days fires; 0 = off."""
    alerts_keys_refresh: float = Field(300.0, gt=0)
    """Seconds between two listings of every tenant's API keys (expiry is judged in days)."""

    @field_validator("alerts_webhook_urls", "alerts_slack_urls",
                     "alerts_pagerduty_routing_keys", "alerts_smtp_to", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        return url_list(value)

    @field_validator("alerts_webhook_signing_key")
    @classmethod
    def _whsec(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value()
        if text and not re.fullmatch(r"whsec_[A-Za-z0-9+/]+={0,2}", text):
            raise ValueError("must be whsec_<base64 of 24 to 64 random bytes>")
        return value

    @model_validator(mode="after")
    def _email_complete(self) -> AlertFields:
        if self.alerts_smtp_host and not (self.alerts_smtp_from and self.alerts_smtp_to):
            raise ValueError("alerts_smtp_host needs alerts_smtp_from and alerts_smtp_to")
        return self

    @field_validator("alerts_webhook_urls", "alerts_slack_urls", "alerts_pagerduty_url")
    @classmethod
    def _http_urls(cls, value: Any) -> Any:
        for url in [value] if isinstance(value, str) else value:
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
