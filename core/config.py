"""Typed configuration, one object per component (STYLE.md "Config and errors").

Each value comes from, in order: the environment (`THAW_<FIELD>`), the config file
(`$THAW_CONFIG`, a TOML file with one table per component: [scheduler], [gateway],
[agent]), then the field's default. A bad value fails at start-up naming its key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from typing_extensions import Self

from thaw.core.errors import InvalidArgument
from thaw.core.units import parse_size


def default_home() -> Path:
    return Path(os.environ.get("THAW_HOME", ".thaw")).resolve()


class _ComponentConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THAW_", extra="ignore", frozen=True)
    _table: ClassVar[str] = ""

    home: Path = Field(default_factory=default_home)
    """Where this component keeps its data (THAW_HOME)."""
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    """Least severe log level written."""
    log_json: bool = False
    """JSON log lines instead of the console format."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("THAW_CONFIG")
        if path:
            sources.append(TomlConfigSettingsSource(
                settings_cls, toml_file=Path(path), toml_table_header=(cls._table,)))
        return tuple(sources)

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Build the config, turning validation errors into one readable InvalidArgument."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            raise InvalidArgument(
                f"bad {cls._table} setting {key} (THAW_{key.upper()}): {first['msg']}",
                field=key) from exc


class SchedulerConfig(_ComponentConfig):
    _table: ClassVar[str] = "scheduler"

    scheduler_listen: str = "127.0.0.1:7070"
    """host:port for the scheduler's gRPC server (port 0 picks a free one)."""
    database_url: str = ""
    """SQLAlchemy URL; empty = SQLite at $THAW_HOME/scheduler/thaw.db."""
    heartbeat_interval: float = Field(2.0, gt=0, le=60)
    """Seconds between agent heartbeats."""
    node_timeout: float = Field(10.0, gt=0)
    """A node silent this long is marked lost and its instances with it."""
    build_timeout: float = Field(900.0, gt=0)
    """Longest a snapshot build may take."""
    acquire_wait: float = Field(600.0, gt=0)
    """Longest an invocation waits for an instance (queue + cold start)."""
    reconcile_interval: float = Field(1.0, gt=0)
    """How often autoscaling and scale-to-zero run."""

    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        path = self.home / "scheduler" / "thaw.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"


class GatewayConfig(_ComponentConfig):
    _table: ClassVar[str] = "gateway"

    gateway_host: str = "127.0.0.1"
    """Address the HTTP gateway binds."""
    gateway_port: int = Field(8000, ge=0, le=65535)
    """Port of the HTTP gateway (0 picks a free one)."""
    scheduler_address: str = "127.0.0.1:7070"
    """host:port of the scheduler's gRPC server."""
    public_url: str = ""
    """Base URL printed for function URLs; empty = http://host:port."""
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    """Largest invocation body accepted (413 past it)."""
    max_bundle_bytes: int = Field(64 * 1024 * 1024, gt=0)
    """Largest bundle upload accepted."""


class AgentConfig(_ComponentConfig):
    _table: ClassVar[str] = "agent"

    node_id: str = ""
    """Stable name of this node; empty = the host name."""
    agent_host: str = "127.0.0.1"
    """Address the control (gRPC) and data (HTTP) servers bind."""
    agent_port: int = Field(7071, ge=0, le=65535)
    """gRPC control port (0 picks a free one)."""
    data_port: int = Field(7072, ge=0, le=65535)
    """HTTP data-plane port (0 picks a free one)."""
    scheduler_address: str = "127.0.0.1:7070"
    """host:port of the scheduler's gRPC server."""
    device: str = Field("host", pattern="^(host|cuda)$")
    """Device backend: host (virtual devices) or cuda."""
    host_devices: str = "1x8GiB"
    """Virtual devices for the host backend: COUNTxSIZE, e.g. 2x8GiB."""
    cuda_reserve: str = "1GiB"
    """cuda backend: memory kept out of slices on each GPU (agent context, driver)."""
    cuda_instance_overhead: str = "512MiB"
    """cuda backend: memory booked beside each slice for its instance's CUDA context."""
    cuda_mps: str = Field("auto", pattern="^(auto|on|off)$")
    """cuda backend: apply gpu_compute shares through MPS (auto = if its daemon runs)."""
    pinned_capacity: str = "4GiB"
    """Host-memory (pinned) tier capacity."""
    shm_dir: Path = Path("/dev/shm")
    """tmpfs where slices and restored arenas live."""
    runtime: str = Field("process", pattern="^(process|docker)$")
    """Where instances run: processes on this machine, or docker containers."""
    instance_python: str = ""
    """Interpreter for instances; empty = the agent's own."""
    docker_image: str = ""
    """Base image of the docker runtime; empty = thaw/base:<this machine's apt suite>."""
    docker_site_packages: str = ""
    """Host package folders the docker runtime mounts read-only into instances
    (os.pathsep-separated, e.g. a virtualenv's site-packages); empty = none."""
    start_timeout: float = Field(600.0, gt=0)
    """Longest a fresh start, restore or template may take to become ready."""

    @field_validator("host_devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        parse_host_devices(value)
        return value

    @field_validator("pinned_capacity", "cuda_reserve", "cuda_instance_overhead")
    @classmethod
    def _check_pinned(cls, value: str) -> str:
        parse_size(value)
        return value


def parse_host_devices(value: str) -> list[int]:
    """`2x8GiB` -> [8 GiB, 8 GiB]; `8GiB,4GiB` -> [8 GiB, 4 GiB]."""
    sizes: list[int] = []
    for part in value.split(","):
        part = part.strip()
        count, _, size = part.partition("x") if "x" in part else ("1", "", part)
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"bad device count in {part!r} (use e.g. 2x8GiB)")
        sizes.extend([parse_size(size)] * int(count))
    return sizes
