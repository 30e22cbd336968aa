"""The services' settings (thaw.core.config) and `thaw config show`: one precedence for
every component (flag > environment > config file > default), where each value came
from, bad and unknown keys named, secrets masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from thaw.core.config import (
    COMPONENTS,
    AgentConfig,
    GatewayConfig,
    SchedulerConfig,
    Setting,
    mask_url,
)
from thaw.core.errors import InvalidArgument
from thaw.gateway.config import GatewaySettings
from thaw.ops.cli import cli
from thaw.ops.services import LocalPlatform
from thaw.scheduler.policy import PolicyConfig

# One numeric key per component, with its default and a value per layer.
CASES = [
    ("scheduler", "node_timeout", 10.0, (11.0, 12.0, 13.0)),
    ("gateway", "gateway_port", 8000, (9001, 9002, 9003)),
    ("agent", "agent_port", 7071, (7001, 7002, 7003)),
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("THAW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("THAW_HOME", str(tmp_path / "home"))


def by_key(settings: list[Setting]) -> dict[str, Setting]:
    return {s.key: s for s in settings}


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("component", "key", "default", "values"), CASES)
def test_flag_beats_env_beats_file_beats_default(
        component: str, key: str, default: float, values: tuple[float, float, float],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cls = COMPONENTS[component]
    from_file, from_env, from_flag = values
    assert getattr(cls.load(), key) == default
    assert by_key(cls.explain())[key] == Setting(
        key, default, "default", "", cls.model_fields[key].description or "")

    config = write_config(tmp_path / "thaw.toml",
                          f"[{component}]\n{key} = {from_file}\n[other]\n{key} = 1\n")
    monkeypatch.setenv("THAW_CONFIG", str(config))
    assert getattr(cls.load(), key) == from_file
    got = by_key(cls.explain())[key]
    assert (got.value, got.source, got.origin) == (from_file, "file",
                                                   f"{config} [{component}]")

    monkeypatch.setenv(f"THAW_{key.upper()}", str(from_env))
    assert getattr(cls.load(), key) == from_env
    got = by_key(cls.explain())[key]
    assert (got.value, got.source, got.origin) == (from_env, "env", f"THAW_{key.upper()}")

    flags = {key: str(from_flag)}
    assert getattr(cls.load(flags=flags), key) == from_flag
    got = by_key(cls.explain(flags=flags))[key]
    assert (got.value, got.source, got.origin) == (from_flag, "flag", f"--set {key}")
    # The other keys keep their own sources.
    assert by_key(cls.explain(flags=flags))["log_level"].source == "default"


def test_config_flag_replaces_the_config_variable(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    named = write_config(tmp_path / "named.toml", "[agent]\ndata_port = 7100\n")
    given = write_config(tmp_path / "given.toml", "[agent]\nagent_port = 7200\n")
    monkeypatch.setenv("THAW_CONFIG", str(named))
    config = AgentConfig.load(config_file=given)
    assert (config.agent_port, config.data_port) == (7200, 7072)
    assert by_key(AgentConfig.explain(config_file=given))["agent_port"].origin == (
        f"{given} [agent]")


def test_each_component_has_one_object_with_documented_constrained_fields() -> None:
    assert PolicyConfig is SchedulerConfig and GatewaySettings is GatewayConfig
    # The policy and alerting settings are part of their component's one object.
    assert "pressure_at" in SchedulerConfig.model_fields
    assert "alerts_interval" in GatewayConfig.model_fields
    gateway = GatewayConfig.load()
    assert GatewaySettings.of(gateway) is gateway
    for cls in COMPONENTS.values():
        for key, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{key} has no docstring"
            assert "\n" not in field.description, f"{cls.__name__}.{key}: one line"


def test_policy_settings_come_from_the_scheduler_table(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path / "thaw.toml", "[scheduler]\npressure_at = 0.7\n")
    monkeypatch.setenv("THAW_CONFIG", str(config))
    assert PolicyConfig.load().pressure_at == 0.7
    assert SchedulerConfig.load(flags={"pressure-at": "0.75"}).pressure_at == 0.75


def test_a_bad_value_names_its_key_and_where_it_came_from(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("THAW_GATEWAY_PORT", "eighty")
    with pytest.raises(InvalidArgument) as err:
        GatewayConfig.load()
    assert err.value.field == "gateway_port"
    assert "gateway_port" in err.value.message and "THAW_GATEWAY_PORT" in err.value.message
    monkeypatch.delenv("THAW_GATEWAY_PORT")

    config = write_config(tmp_path / "thaw.toml", "[agent]\ndevice = 'tpu'\n")
    with pytest.raises(InvalidArgument) as err:
        AgentConfig.load(config_file=config)
    assert err.value.field == "device" and f"{config} [agent]" in err.value.message

    with pytest.raises(InvalidArgument) as err:
        SchedulerConfig.load(flags={"pressure_critical_at": "0.5"})
    assert err.value.field == "pressure_critical_at"
    assert "--set pressure_critical_at" in err.value.message


def test_unknown_keys_in_flags_and_the_file_are_refused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidArgument) as err:
        GatewayConfig.load(flags={"gateway_prot": "1"})
    assert err.value.field == "gateway_prot" and "--set gateway_prot" in err.value.message
    config = write_config(tmp_path / "thaw.toml", "[scheduler]\nnode_timout = 3\n")
    with pytest.raises(InvalidArgument) as err:
        SchedulerConfig.load(config_file=config)
    assert err.value.field == "node_timout"
    # The environment serves every component: a variable another one reads is ignored.
    monkeypatch.setenv("THAW_GATEWAY_PORT", "9000")
    assert SchedulerConfig.load().node_timeout == 10.0
    broken = write_config(tmp_path / "broken.toml", "[scheduler\n")
    with pytest.raises(InvalidArgument, match="cannot read the config file"):
        SchedulerConfig.load(config_file=broken)


def test_flags_parse_like_the_environment() -> None:
    config = GatewayConfig.load(flags={
        "alerts_webhook_urls": "http://a/hook,http://b/hook",
        "alerts_overrides": '{"p99_latency": {"enabled": false}}',
        "fast_lane": "false"})
    assert config.alerts_webhook_urls == ["http://a/hook", "http://b/hook"]
    assert config.alerts_overrides["p99_latency"].enabled is False
    assert config.fast_lane is False


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THAW_DATABASE_URL",
                       "postgresql+psycopg://thaw:hunter2@db:5432/thaw?sslpassword=x")
    shown = by_key(SchedulerConfig.explain())["database_url"]
    assert shown.value == "postgresql+psycopg://thaw:***@db:5432/thaw?***"
    assert "hunter2" not in json.dumps(shown.value)
    # The object itself keeps the real value.
    assert "hunter2" in SchedulerConfig.load().database_url
    settings = by_key(GatewayConfig.explain(flags={
        "alerts_slack_urls": "https://hooks.slack.com/services/T0/B0/XYZ",
        "alerts_webhook_urls": "https://bot:pw@example.com/hook?token=abc"}))
    assert settings["alerts_slack_urls"].value == ["https://hooks.slack.com/***"]
    assert settings["alerts_webhook_urls"].value == ["https://bot:***@example.com/***?***"]
    assert mask_url("sqlite:////var/lib/thaw/thaw.db") == "sqlite:////var/lib/thaw/thaw.db"
    assert mask_url("not a url") == "***" and mask_url("") == ""


def test_config_show_json_and_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = write_config(tmp_path / "thaw.toml",
                          "[gateway]\ngateway_port = 9100\nalerts_slack_urls = "
                          "['https://hooks.slack.com/services/T/B/secret']\n")
    monkeypatch.setenv("THAW_CONFIG", str(config))
    monkeypatch.setenv("THAW_LOG_LEVEL", "debug")
    runner = CliRunner()
    result = runner.invoke(cli, ["config", "show", "gateway", "--json",
                                 "--set", "lease_linger=0.5"])
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in json.loads(result.output)}
    assert set(rows) == set(GatewayConfig.model_fields)
    assert (rows["lease_linger"]["value"], rows["lease_linger"]["source"]) == (0.5, "flag")
    assert (rows["log_level"]["source"], rows["log_level"]["from"]) == ("env",
                                                                        "THAW_LOG_LEVEL")
    assert rows["gateway_port"]["from"] == f"{config} [gateway]"
    assert rows["max_body_bytes"]["source"] == "default"
    assert "secret" not in result.output

    table = runner.invoke(cli, ["config", "show", "gateway"])
    assert table.exit_code == 0, table.output
    assert table.output.split()[:4] == ["key", "value", "source", "from"]
    line = next(x for x in table.output.splitlines() if x.split()[0] == "gateway_port")
    assert line.split()[1:] == ["9100", "file", str(config), "[gateway]"]
    assert "secret" not in table.output

    every = runner.invoke(cli, ["config", "show", "--json"])
    components = {r["component"] for r in json.loads(every.output)}
    assert components == {"scheduler", "gateway", "agent"}
    assert runner.invoke(cli, ["config", "show", "--set", "x=1"]).exit_code == 2
    assert runner.invoke(cli, ["config", "show", "agent", "--set", "x"]).exit_code == 2


def test_config_show_help_tells_the_sources() -> None:
    text = CliRunner().invoke(cli, ["config", "show", "--help"]).output
    for word in ("--set", "THAW_KEY", "$THAW_CONFIG", "default", "masked", "--json"):
        assert word in text
    for service in ("scheduler", "gateway", "agent"):
        text = CliRunner().invoke(cli, [service, "--help"]).output
        assert "--set KEY=VALUE" in text and "--config FILE" in text


def run_thaw(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("THAW_")}
    return subprocess.run([sys.executable, "-m", "thaw.ops", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_bad_setting_is_one_line_and_exit_1_for_show_and_the_services() -> None:
    shown = run_thaw("config", "show", "agent", "--set", "agent_port=x")
    assert shown.returncode == 1
    assert shown.stderr.startswith("error: bad agent setting agent_port (--set agent_port)")
    service = run_thaw("scheduler", "--set", "node_timeout=-1")
    assert service.returncode == 1 and "node_timeout" in service.stderr


def test_thaw_up_leaves_the_gateway_port_to_the_settings_unless_given(tmp_path: Path) -> None:
    assert LocalPlatform(tmp_path, None, None)._gateway_port_env() == {}
    assert LocalPlatform(tmp_path, 0, None)._gateway_port_env() == {"THAW_GATEWAY_PORT": "0"}
