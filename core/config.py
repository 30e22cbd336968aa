"""Typed configuration: one settings object per component (scheduler, gateway, agent).

Every value comes from the first of these that has it:
1. a flag: `--set KEY=VALUE` of `thaw scheduler|gateway|agent` (or a keyword argument
   given to `load` by code),
2. the environment: `THAW_<KEY>` (case-insensitive),
3. the config file: `--config FILE`, else `$THAW_CONFIG`; a TOML file with one table
   per component: [scheduler], [gateway], [agent],
4. the field's default.

Flags and file keys must name a setting of the component; environment variables that
name none are ignored (one environment serves every component). A bad value fails at
start-up naming its key and where it came from. `thaw config show` prints each value
with its source (`explain`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import tomllib
from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from typing_extensions import Self

from thaw.core.errors import InvalidArgument

from .config_fields import (
    ALERT_RULES,
    AgentFields,
    AlertFields,
    AlertRuleOptions,
    CommonFields,
    GatewayFields,
    InternalTLSFields,
    PolicyFields,
    PressureLevel,
    SchedulerFields,
    default_home,
    parse_host_devices,
)

__all__ = [
    "ALERT_RULES", "COMPONENTS", "AgentConfig", "AlertRuleOptions", "GatewayConfig",
    "PressureLevel", "SchedulerConfig", "Setting", "config_path", "default_home", "mask_url",
    "parse_host_devices",
]

Source = Literal["flag", "env", "file", "default"]


@dataclass(frozen=True)
class Setting:
    """One effective setting of a component and where its value came from."""

    key: str
    value: Any
    """JSON-able; secrets masked."""
    source: Source
    origin: str
    """The flag, the environment variable or `FILE [table]`; empty for a default."""
    doc: str


@dataclass(frozen=True)
class _Inputs:
    flags: Mapping[str, str]
    config_file: Path | None


# What `load` was given, read by `settings_customise_sources` (pydantic-settings builds
# its sources in a classmethod that sees no arguments of the call).
_INPUTS: ContextVar[_Inputs | None] = ContextVar("thaw_config_inputs", default=None)


def config_path(explicit: Path | None = None) -> Path | None:
    """The config file: the one given (`--config`), else $THAW_CONFIG, else none."""
    if explicit is not None:
        return explicit
    named = os.environ.get("THAW_CONFIG", "").strip()
    return Path(named) if named else None


def _flag_key(key: str) -> str:
    return key.strip().lower().replace("-", "_")


class _FlagSettingsSource(EnvSettingsSource):
    """`--set KEY=VALUE` flags, parsed exactly as THAW_KEY=VALUE would be."""

    def __init__(self, settings_cls: type[BaseSettings], flags: Mapping[str, str]) -> None:
        self._flags = {f"thaw_{_flag_key(k)}": v for k, v in flags.items()}
        super().__init__(settings_cls, case_sensitive=False, env_prefix="THAW_")

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._flags


def mask_url(url: str, whole_path: bool = False) -> str:
    """`url` with its password and query hidden (and its path, with `whole_path`: a
    webhook's path is often its token); a value that is no URL is hidden whole."""
    if not url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***"
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else f"{user}@{hostport}"
    path, question, _query = path.partition("?")
    if whole_path and path:
        path = "***"
    return f"{scheme}://{netloc}{slash}{path}{'?***' if question else ''}"


def _masked(value: Any, secret: str) -> Any:
    # secret: "password" (a URL whose password and query are hidden) or "url" (a URL or
    # a list of them whose path is the secret too).
    if isinstance(value, list):
        return [_masked(v, secret) for v in value]
    if isinstance(value, str):
        return mask_url(value, whole_path=secret == "url")
    return "***"


class _ComponentConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THAW_", extra="ignore", frozen=True,
                                      use_attribute_docstrings=True)
    _table: ClassVar[str] = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        inputs = _INPUTS.get() or _Inputs({}, None)
        sources: list[PydanticBaseSettingsSource] = [init_settings]
        if inputs.flags:
            sources.append(_FlagSettingsSource(settings_cls, inputs.flags))
        sources.append(env_settings)
        path = config_path(inputs.config_file)
        table = cls._file_table(path)
        if table:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=table))
        return tuple(sources)

    @classmethod
    def load(cls, *, flags: Mapping[str, str] | None = None,
             config_file: Path | None = None, **overrides: Any) -> Self:
        """Build the settings from flags, environment, config file and defaults (the
        module's docstring); `overrides` (from code) come before all of them. Unknown
        keys in flags or the file, and bad values, raise InvalidArgument naming the key."""
        flags = dict(flags or {})
        for key in flags:
            cls._known(key, f"--set {key}")
        path = config_path(config_file)
        table = cls._file_table(path)
        for key in table:
            cls._known(key, f"{path} [{cls._table}]")
        with cls._given(flags, config_file):
            try:
                return cls(**overrides)
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = [str(p) for p in first["loc"]]
                key = ".".join(loc)
                top = loc[0] if loc else ""
                where = cls._origin(top, flags, path, table, overrides)[1] if top else ""
                raise InvalidArgument(
                    f"bad {cls._table} setting {key} ({where or 'default'}): {first['msg']}",
                    field=key) from exc

    @classmethod
    def explain(cls, flags: Mapping[str, str] | None = None,
                config_file: Path | None = None) -> list[Setting]:
        """Every setting's effective value (secrets masked) and where it came from."""
        flags = dict(flags or {})
        config = cls.load(flags=flags, config_file=config_file)
        values = config.model_dump(mode="json", by_alias=True)
        path = config_path(config_file)
        table = cls._file_table(path)
        out = []
        for key, field in cls.model_fields.items():
            source, origin = cls._origin(key, flags, path, table, {})
            value = values[key]
            extra = field.json_schema_extra
            secret = extra.get("secret") if isinstance(extra, dict) else None
            if isinstance(secret, str) and value not in ("", [], None):
                value = _masked(value, secret)
            out.append(Setting(key, value, source, origin, field.description or ""))
        return out

    @classmethod
    def of(cls, config: _ComponentConfig) -> Self:
        """`config` as this class: itself when it is one, else rebuilt with its values
        winning over the other sources."""
        if isinstance(config, cls):
            return config
        return cls.load(**config.model_dump())

    @classmethod
    def _known(cls, key: str, where: str) -> None:
        if _flag_key(key) not in cls.model_fields:
            raise InvalidArgument(
                f"unknown {cls._table} setting {key!r} ({where}); "
                f"`thaw config show {cls._table}` lists them", field=key)

    @classmethod
    def _file_table(cls, path: Path | None) -> dict[str, Any]:
        if path is None or not path.is_file():
            return {}
        try:
            with path.open("rb") as f:
                table = tomllib.load(f).get(cls._table, {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"cannot read the config file {path}: {exc}",
                                  field="config") from exc
        if not isinstance(table, dict):
            raise InvalidArgument(f"{path}: [{cls._table}] is not a table", field=cls._table)
        return table

    @classmethod
    def _origin(cls, key: str, flags: Mapping[str, str], path: Path | None,
                table: Mapping[str, Any], overrides: Mapping[str, Any]) -> tuple[Source, str]:
        if key in overrides:
            return "flag", f"argument {key}"
        for given in flags:
            if _flag_key(given) == key:
                return "flag", f"--set {given}"
        wanted = f"thaw_{key}"
        for name in os.environ:
            if name.lower() == wanted:
                return "env", name
        if key in table:
            return "file", f"{path} [{cls._table}]"
        return "default", ""

    @classmethod
    @contextmanager
    def _given(cls, flags: Mapping[str, str], config_file: Path | None) -> Iterator[None]:
        token = _INPUTS.set(_Inputs(flags, config_file))
        try:
            yield
        finally:
            _INPUTS.reset(token)


# Bases: the field groups in the order they are listed by `explain`, then the sources.
class SchedulerConfig(PolicyFields, SchedulerFields, InternalTLSFields, CommonFields,
                      _ComponentConfig):
    """The scheduler's settings, placement and memory-pressure policy included."""

    _table: ClassVar[str] = "scheduler"

    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        path = self.home / "scheduler" / "thaw.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"


class GatewayConfig(AlertFields, GatewayFields, InternalTLSFields, CommonFields,
                    _ComponentConfig):
    """The gateway's settings, protection and alerting included."""

    _table: ClassVar[str] = "gateway"


class AgentConfig(AgentFields, InternalTLSFields, CommonFields, _ComponentConfig):
    """A node agent's settings."""

    _table: ClassVar[str] = "agent"


COMPONENTS: dict[str, type[_ComponentConfig]] = {
    "scheduler": SchedulerConfig, "gateway": GatewayConfig, "agent": AgentConfig}
"""Each component's settings class, by its table name."""
