"""The fields of each component's settings (core/config.py composes them and reads
their sources). Every field has a default, a constraint and a docstring; the field's
name is its key: THAW_<KEY> in the environment, KEY in the config file's table."""

from __future__ import annotations

import ipaddress
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from thaw.core.config_alerts import ALERT_RULES as ALERT_RULES
from thaw.core.config_alerts import AlertFields as AlertFields
from thaw.core.config_alerts import AlertRuleOptions as AlertRuleOptions
from thaw.core.config_alerts import PressureLevel as PressureLevel
from thaw.core.config_alerts import url_list as _url_list
from thaw.core.http1limits import (
    BODY_DEADLINE_SECONDS,
    BODY_TIMEOUT_SECONDS,
    HEADER_TIMEOUT_SECONDS,
    IDLE_TIMEOUT_SECONDS,
    MAX_GATEWAY_LINE_BYTES,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_LINE_BYTES,
)
from thaw.core.units import parse_size

# Secrets, masked by `thaw config show`: "password" = a URL whose password and query
# are hidden; "url" = URLs whose path (a webhook's token) is hidden too.
_PASSWORD: dict[str, Any] = {"secret": "password"}
_URL_SECRET: dict[str, Any] = {"secret": "url"}


def default_home() -> Path:
    """$THAW_HOME, else ./.thaw, as an absolute path."""
    return Path(os.environ.get("THAW_HOME", ".thaw")).resolve()


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


_HOST_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)"
                        r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def webhook_allow_entry(entry: str) -> str:
    """An entry of webhook_allow, normalised: an IP network (CIDR; an address is a /32
    or /128) or a host name, lower case."""
    text = entry.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        pass
    if not _HOST_NAME.match(text):
        raise ValueError(f"{entry!r} is neither a host name nor an IP network (CIDR)")
    return text


class _Fields(BaseSettings):
    # The same config as the composed settings classes, so the merge order of bases
    # cannot change it.
    model_config = SettingsConfigDict(env_prefix="THAW_", extra="ignore", frozen=True,
                                      use_attribute_docstrings=True)


class CommonFields(_Fields):
    home: Path = Field(default_factory=default_home)
    """Where this component keeps its data (THAW_HOME)."""
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    """Least severe log level written."""
    log_json: bool = False
    """JSON log lines instead of the console format."""


class InternalTLSFields(_Fields):
    # Internal gRPC is mutual TLS under the platform's CA (core/pki.py); `thaw up` makes
    # the files under $THAW_HOME/pki, `thaw pki init` anywhere.
    tls_ca: Path | None = None
    """The platform CA's certificate (PEM); empty = $THAW_HOME/pki/ca.crt."""
    tls_cert: Path | None = None
    """This component's certificate (PEM); empty = $THAW_HOME/pki/<component>.crt."""
    tls_key: Path | None = None
    """Its private key (PEM, mode 0600); empty = $THAW_HOME/pki/<component>.key."""
    insecure_internal: bool = False
    # Loud on purpose: every start logs a warning while it is on.
    """DEVELOPMENT ONLY: internal gRPC in plaintext with no credential at all."""


class SchedulerFields(_Fields):
    scheduler_listen: str = Field("127.0.0.1:7070", pattern=r"^.+:\d{1,5}$")
    """host:port for the scheduler's gRPC server (port 0 picks a free one)."""
    database_url: str = Field("", pattern=r"^$|^[a-z][a-z0-9+.-]*://",
                              json_schema_extra=_PASSWORD)
    """SQLAlchemy URL; empty = SQLite at $THAW_HOME/scheduler/thaw.db."""
    heartbeat_interval: float = Field(2.0, gt=0, le=60)
    """Seconds between agent heartbeats."""
    node_timeout: float = Field(10.0, gt=0)
    """A node silent this long is marked lost and its instances with it."""
    build_timeout: float = Field(900.0, gt=0)
    """Longest a snapshot build may take."""
    build_attempts: int = Field(3, ge=1, le=20)
    """Nodes a snapshot build may be interrupted on (its agent died) before it fails."""
    acquire_wait: float = Field(600.0, gt=0)
    """Longest an invocation waits for an instance (queue + cold start)."""
    reconcile_interval: float = Field(1.0, gt=0)
    """How often autoscaling and scale-to-zero run."""
    metrics_listen: str = Field("", pattern=r"^$|^.+:\d{1,5}$")
    """host:port serving the scheduler's Prometheus metrics at /metrics; empty = off."""
    scheduler_health_listen: str = Field("", pattern=r"^$|^(.+:)?\d{1,5}$")
    """port or host:port (a port alone: loopback) serving /livez and /readyz; empty = off."""
    gc_interval: float = Field(600.0, ge=0, le=7 * 86_400, allow_inf_nan=False)
    """Seconds between garbage collections on every node (0 = only `thaw node gc`)."""
    gc_log_age: float = Field(86_400.0, ge=0, le=365 * 86_400, allow_inf_nan=False)
    """Seconds a node keeps the log of an instance that ended (then collected)."""
    schedule_tick_seconds: float = Field(1.0, gt=0, le=60, allow_inf_nan=False)
    """How often functions' cron schedules are looked at (docs/schedules.md)."""
    schedule_grace_seconds: float = Field(60.0, ge=0, le=86_400, allow_inf_nan=False)
    """A due time found later than this (the scheduler was down) is skipped, not run."""
    schedule_clock_file: str = ""
    """Tests only: a file holding seconds added to the clock schedules run by; empty = none."""


class PolicyFields(_Fields):
    pressure_at: float = Field(0.80, gt=0, lt=1)
    """Used fraction of a device or pinned tier at which it enters PRESSURE."""
    pressure_critical_at: float = Field(0.90, gt=0, lt=1)
    """Used fraction at which it enters CRITICAL."""
    pressure_emergency_at: float = Field(0.97, gt=0, le=1)
    """Used fraction at which it enters EMERGENCY (no new cold starts on the node)."""
    pressure_hysteresis: float = Field(0.05, ge=0, lt=0.5)
    """A level is left only once usage is this far below the threshold that entered it."""
    pressure_pinned_idle: float = Field(300.0, ge=0)
    """Seconds unused after which a function's pinned snapshot is evicted under CRITICAL."""
    placement_queue_max: int = Field(1000, ge=0)
    """Requests that may wait for room on some node at once; past it: NoCapacity."""
    placement_queue_timeout: float = Field(60.0, gt=0)
    """Longest a request waits for room (nothing fits, nothing to evict)."""
    function_queue_max: int = Field(10_000, ge=1)
    """Requests that may wait for a busy function's instances at once; past it: NoCapacity."""
    priority_aging_rate: float = Field(1.0, ge=0, le=100)
    """Starvation guard: priority levels a waiting call gains per second waited; 0 = strict."""

    @field_validator("pressure_critical_at", "pressure_emergency_at", "pressure_hysteresis")
    @classmethod
    def _ordered(cls, value: float, info: ValidationInfo) -> float:
        # Fields validate in declaration order: the ones compared against are in data
        # (absent when they were invalid themselves, which is reported on its own).
        below = {"pressure_critical_at": "pressure_at",
                 "pressure_emergency_at": "pressure_critical_at"}.get(info.field_name or "")
        if below is not None and below in info.data and value <= info.data[below]:
            raise ValueError(f"must be above {below} ({info.data[below]})")
        if (info.field_name == "pressure_hysteresis" and "pressure_at" in info.data
                and value >= info.data["pressure_at"]):
            raise ValueError(f"must be below pressure_at ({info.data['pressure_at']})")
        return value


class GatewayFields(_Fields):
    # Every limit here is held in one gateway process's memory: with several replicas
    # behind a load balancer each enforces it on its own share of the traffic.
    gateway_host: str = Field("127.0.0.1", min_length=1)
    """Address the HTTP gateway binds."""
    uvloop: bool = True
    """Run the gateway's event loop on uvloop when it is installed."""
    gateway_port: int = Field(8000, ge=0, le=65535)
    """Port of the HTTP gateway (0 picks a free one)."""
    scheduler_address: str = Field("127.0.0.1:7070", pattern=r"^.+:\d{1,5}$")
    """host:port of the scheduler's gRPC server."""
    function_host: str = ""
    """Address the function origin's listener binds (function URLs only); empty = gateway_host."""
    function_port: int = Field(-1, ge=-1, le=65535)
    # Its own origin, so a function's page cannot read the dashboard's stored key.
    """Port of the function origin; -1 = gateway_port + 1 (a free one when that is 0)."""
    public_url: str = Field("", pattern=r"^$|^https?://")
    """Base URL of function URLs (the function origin's); empty = http://host:function_port."""
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    """Largest invocation body accepted (413 past it)."""
    max_bundle_bytes: int = Field(64 * 1024 * 1024, gt=0)
    """Largest bundle upload accepted."""
    max_image_archive_bytes: int = Field(16 * 1024**3, gt=0)
    """Largest image archive (`thaw deploy image.tar`) one tenant may upload; 413 past it."""
    # Bounds on what a client sends and how slowly (docs/limits.md); both listeners,
    # fast lane and aiohttp, hold them.
    max_request_line_bytes: int = Field(MAX_LINE_BYTES, ge=256, le=MAX_GATEWAY_LINE_BYTES)
    """Longest request target (path and query) accepted; 431 past it."""
    max_header_bytes: int = Field(MAX_LINE_BYTES, ge=256, le=1024 * 1024)
    """Longest single header (name and value) accepted; 431 past it."""
    max_headers: int = Field(MAX_HEADERS, ge=8, le=10_000)
    """Most headers one request may carry; 431 past it."""
    max_head_bytes: int = Field(MAX_HEAD_BYTES, ge=1024, le=16 * 1024 * 1024)
    """Largest whole request head (request line and headers); 431 past it."""
    header_timeout_seconds: float = Field(HEADER_TIMEOUT_SECONDS, gt=0, le=3600)
    """Seconds to send a request's head (a new connection: from its opening); then closed."""
    idle_timeout_seconds: float = Field(IDLE_TIMEOUT_SECONDS, gt=0, le=3600)
    """Seconds a kept-alive connection may wait for its next request before it closes."""
    body_timeout_seconds: float = Field(BODY_TIMEOUT_SECONDS, gt=0, le=3600)
    """Seconds a request body may pause between two reads; then 408 and closed."""
    body_deadline_seconds: float = Field(BODY_DEADLINE_SECONDS, gt=0, le=86_400)
    """Seconds a whole request body may take to arrive, however steadily (408, closed)."""
    max_connections_per_address: int = Field(256, ge=0, le=1_000_000)
    # Counted by the socket's peer: behind a proxy every client shares its address.
    """Open connections one client address may hold (both ports together); 0 = no cap."""
    max_json_bytes: int = Field(1024 * 1024, gt=0)
    """Largest JSON body the gateway parses (API and OpenAI routes); 413 past it."""
    max_json_depth: int = Field(64, ge=1, le=512)
    """Deepest nesting of arrays and objects in a JSON body; 400 past it."""
    rate_limit_rpm: float = Field(0.0, ge=0)
    """Requests per minute per API key, per replica (token bucket); 0 = no limit."""
    rate_limit_burst: int = Field(0, ge=0)
    """Requests a key may make at once before the per-minute rate applies; 0 = rpm."""
    queue_high_water: int = Field(200, ge=1)
    """Requests of one function waiting (per replica) at which new ones are shed (429)."""
    queue_low_water: int = Field(100, ge=0)
    """Once shedding, new requests are admitted again only when the queue is this short."""
    breaker_failures: int = Field(5, ge=1)
    # Infrastructure failures: a crash, a hang, a node unreachable.
    """Consecutive infrastructure failures that open a function's or a node's circuit."""
    breaker_cooldown: float = Field(5.0, gt=0)
    """Seconds a circuit stays open before one probe request is let through."""
    lease_linger: float = Field(0.2, ge=0, le=10)
    """Seconds an idle lease is kept for the function's next call; 0 = one per call."""
    lease_max_age: float = Field(2.0, gt=0, le=60)
    # Fairness to other replicas, and old versions retire.
    """Seconds after which a lease goes back to the scheduler even under steady traffic."""
    priority_aging_rate: float = Field(1.0, ge=0, le=100)
    """Priority levels a call waiting in this replica gains per second (as the scheduler's)."""
    fast_lane: bool = True
    # Plain calls: a key, a body of at most 1 MiB by Content-Length, no Prefer,
    # Idempotency-Key or webhook; the rest go to aiohttp on the same port. Off, aiohttp
    # serves everything: the same answers, about 0.15 ms slower a call.
    """Serve plain function calls with the lean HTTP/1.1 server of gateway/lane.py."""
    sync_wait_seconds: float = Field(60.0, gt=0, le=3600)
    """Seconds a sync call holds its request; then 303 to its result URL."""
    tracing: bool = True
    """Trace calls: read, pass on and answer traceparent, keep and export spans."""
    traces_kept: int = Field(1000, ge=0, le=100_000)
    """Recent traces kept in memory for /v1/traces and the dashboard (0 = none)."""
    files_url_ttl_seconds: float = Field(3600.0, gt=0, le=7 * 86_400)
    # A file a handler returns is stored by the gateway and answered as a signed URL
    # (docs/function-api.md, "Files"); the file is collected once its URL expires.
    """Seconds a function's output file and its signed URL last."""
    files_max_bytes: int = Field(1024**3, gt=0)
    """Bytes of output files one tenant may have stored at once; quota_exceeded past it."""
    files_dir: str = ""
    """Where output files and their URL signing key are kept; empty = THAW_HOME/files."""
    max_input_files: int = Field(16, ge=1, le=1000)
    """Most parts a multipart/form-data call may have (files and fields together)."""
    result_ttl_seconds: float = Field(86_400.0, gt=0, le=90 * 86_400)
    # Stored: async, past the wait limit, or under an Idempotency-Key; once expired,
    # GET answers 410 and the key may be used again.
    """Seconds a stored invocation result is kept."""
    async_concurrency: int = Field(32, ge=1, le=10_000)
    """Queued invocations this replica runs at once."""
    invocation_claim_seconds: float = Field(30.0, ge=1, le=3600)
    # Renewed while it runs; if the replica dies another takes it once the claim lapses.
    """Seconds a replica's claim on a queued invocation it runs lasts."""
    webhook_attempts: int = Field(5, ge=1, le=20)
    """Deliveries tried per webhook (exponential backoff between them)."""
    webhook_backoff_seconds: float = Field(1.0, gt=0, le=600)
    """Wait before the second webhook delivery; it doubles for each one after."""
    webhook_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Cloud metadata addresses stay refused whatever this says (gateway/stored/targets.py).
    """Webhook hosts and networks let through the deny list (e.g. hooks.corp, 10.8.0.0/16)."""
    operator_tenant: str = Field("dev", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    # The operator sees nodes, events, all tenants and quotas; `thaw up`'s dev key is in "dev".
    """The tenant whose admin keys are the platform operator's."""
    trust_forwarded_for: bool = False
    # The audit log records both either way.
    """Rate-limit anonymous calls and failed logins by X-Forwarded-For (trusted proxy only)."""
    auth_failure_limit: int = Field(30, ge=0, le=1_000_000)
    # Keys the replica's auth cache already knows keep working from that address.
    """Bad or unknown API keys one address may send within auth_failure_window; 0 = off."""
    auth_failure_window: float = Field(60.0, gt=0, le=86_400)
    """Seconds auth_failure_limit counts over; past it: 429 until the oldest failure leaves."""
    # Prices (docs/usage.md, "Cost"): each call's cost is computed when it is metered
    # and stored with it, so a later change leaves the costs of earlier calls as they were.
    price_per_call: Decimal = Field(Decimal(0), ge=0, le=1_000_000, allow_inf_nan=False)
    """Price of one call that reached an instance; 0 = none."""
    price_cpu_second: Decimal = Field(Decimal(0), ge=0, le=1_000_000, allow_inf_nan=False)
    """Price of a second a call held its instance (one CPU); 0 = none."""
    price_gpu_gib_second: Decimal = Field(Decimal(0), ge=0, le=1_000_000, allow_inf_nan=False)
    """Price of a GiB of GPU slice memory held for a second; 0 = none."""
    price_memory_gib_second: Decimal = Field(Decimal(0), ge=0, le=1_000_000,
                                             allow_inf_nan=False)
    """Price of a GiB of an instance's host-memory limit held for a second; 0 = none."""
    price_currency: str = Field("USD", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,15}$")
    """The currency the prices are in (a label shown with costs)."""
    cost_header: bool = False
    """Send every sync call's cost in X-Thaw-Cost (else only when it asks: X-Thaw-Want-Cost: 1)."""

    @field_validator("webhook_allow", mode="before")
    @classmethod
    def _split_allow(cls, value: Any) -> Any:
        return _url_list(value)

    @field_validator("webhook_allow")
    @classmethod
    def _hosts_or_networks(cls, value: list[str]) -> list[str]:
        return [webhook_allow_entry(entry) for entry in value]

    @field_validator("function_port")
    @classmethod
    def _own_port(cls, value: int, info: ValidationInfo) -> int:
        if value > 0 and value == info.data.get("gateway_port"):
            raise ValueError("must differ from gateway_port: functions get an origin of "
                             "their own")
        return value

    @property
    def function_listen_port(self) -> int:
        """The function origin's port to bind (function_port resolved)."""
        if self.function_port >= 0:
            return self.function_port
        if self.gateway_port == 0 or self.gateway_port == 65535:
            return 0
        return self.gateway_port + 1

    @field_validator("queue_low_water")
    @classmethod
    def _below_high_water(cls, value: int, info: ValidationInfo) -> int:
        high = info.data.get("queue_high_water")
        if high is not None and value >= high:
            raise ValueError(f"must be below queue_high_water ({high})")
        return value


_INDEX_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)(:[0-9]{1,5})?$")


def index_host_entry(entry: str) -> str:
    """An entry of env_index_hosts: a network (CIDR), or a host with an optional port."""
    entry = entry.strip()
    if "/" in entry:
        return str(ipaddress.ip_network(entry, strict=False))
    match = _INDEX_HOST.match(entry)
    if match is None or not 0 < int((match.group(2) or ":443")[1:]) < 65536:
        raise ValueError(f"{entry!r} is not a host, host:port or network")
    return entry.lower()


class AgentFields(_Fields):
    node_id: str = Field("", max_length=253)
    """Stable name of this node; empty = the host name."""
    agent_host: str = Field("127.0.0.1", min_length=1)
    """Address the control (gRPC) and data (HTTP) servers bind."""
    uvloop: bool = True
    """Run the agent's event loop on uvloop when it is installed."""
    agent_port: int = Field(7071, ge=0, le=65535)
    """gRPC control port (0 picks a free one)."""
    data_port: int = Field(7072, ge=0, le=65535)
    """HTTP data-plane port (0 picks a free one)."""
    agent_health_listen: str = Field("", pattern=r"^$|^(.+:)?\d{1,5}$")
    """port or host:port (a port alone: loopback) serving /livez and /readyz; empty = off."""
    scheduler_address: str = Field("127.0.0.1:7070", pattern=r"^.+:\d{1,5}$")
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
    # At most this many restores fill slices over one PCIe link (host backend: the node)
    # at once; the others wait, and the wait is the start's `queue` stage. 0 derives it
    # from the host-to-device bandwidth measured at startup (platform/activation.py).
    restore_concurrency_per_link: int = Field(0, ge=0, le=1024)
    """Concurrent restores per PCIe link; 0 = derived from measured H2D bandwidth."""
    pinned_capacity: str = "4GiB"
    """Host-memory (pinned) tier capacity."""
    shm_dir: Path = Path("/dev/shm")
    """tmpfs where slices and restored arenas live."""
    storage_min_free: str = "256MiB"
    """Free space under which a data directory (home, shm_dir) counts as full (507)."""
    runtime: str = Field("process", pattern="^(process|docker)$")
    """Where instances run: processes on this machine, or docker containers."""
    instance_python: str = Field("", max_length=4096)
    """Interpreter for instances; empty = the agent's own."""
    docker_image: str = Field("", max_length=255)
    """Base image of the docker runtime; empty = thaw/base:<this machine's apt suite>."""
    docker_site_packages: str = Field("", max_length=65536)
    """Host package folders (os.pathsep-separated) docker mounts read-only into instances."""
    start_timeout: float = Field(600.0, gt=0)
    """Longest a fresh start, restore or template may take to become ready."""
    restored_templates: bool = True
    """Fork a snapshot's warm instances from one process that restored it (docs/density.md)."""
    restored_template_idle_seconds: float = Field(60.0, ge=0.0, le=86_400,
                                                  allow_inf_nan=False)
    """How long a restored template outlives its snapshot's last instance; 0 = not at all."""
    zygotes: str = Field("on", pattern="^(on|off)$")
    """process runtime: fork templates from one zygote per Python environment and sandbox."""
    template_memory_budget: str = "0"
    """Memory idle templates may hold before the least recently used stop; 0 = no budget."""
    template_min_available: str = "512MiB"
    """Stop idle templates (least recently used first) while available memory is under this."""
    template_idle_seconds: float = Field(60.0, ge=1.0, le=86_400, allow_inf_nan=False)
    """An idle template unused for less than this many seconds is never stopped for memory."""
    # off runs instances as the agent's user, able to reach each other: development only.
    sandbox: str = Field("on", pattern="^(on|off)$")
    """process runtime: each instance in a sandbox under its tenant's uid (needs root)."""
    sandbox_uids: str = Field("200000-265535", pattern=r"^\d{1,10}-\d{1,10}$")
    """process runtime: the uids (and gids) given to tenants on this node, FIRST-LAST."""
    sandbox_tmp_size: str = "1GiB"
    """process runtime: size of each sandbox's private /tmp and /dev/shm (memory)."""
    sandbox_max_processes: int = Field(4096, ge=16, le=4_194_304)
    """process runtime: processes and threads per tenant on this node (RLIMIT_NPROC)."""
    sandbox_max_open_files: int = Field(65536, ge=64, le=1_048_576)
    """process runtime: open files per instance process (RLIMIT_NOFILE)."""
    sandbox_read_only_paths: str = Field("", max_length=65536)
    """process runtime: host folders (os.pathsep-separated) every sandbox sees read-only."""
    env_index_url: str = Field("", max_length=4096)
    """Package index of per-function environments (URL, wheel folder); empty: UV_INDEX_URL."""
    env_build_timeout: float = Field(900.0, gt=0, le=86_400, allow_inf_nan=False)
    """Seconds a per-function environment's resolve, and its install, may each take."""
    env_max_size: str = "16GiB"
    """Largest per-function environment a node installs (docs/environments.md)."""
    env_index_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Metadata endpoints stay refused whatever this says (core/addresses.py).
    """Environment builds' proxy may also reach these hosts ([host]:port) and networks."""

    # The size fields' constraint: each parses as a size (parse_size, parse_host_devices).
    @field_validator("host_devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        parse_host_devices(value)
        return value

    @field_validator("env_index_hosts", mode="before")
    @classmethod
    def _split_index_hosts(cls, value: Any) -> Any:
        return _url_list(value)

    @field_validator("env_index_hosts")
    @classmethod
    def _index_hosts(cls, value: list[str]) -> list[str]:
        return [index_host_entry(entry) for entry in value]

    @field_validator("sandbox_uids")
    @classmethod
    def _check_uids(cls, value: str) -> str:
        first, _, last = value.partition("-")
        if not 0 < int(first) <= int(last) < 2**31:
            raise ValueError("must be FIRST-LAST with 0 < FIRST <= LAST < 2**31")
        return value

    @field_validator("pinned_capacity", "cuda_reserve", "cuda_instance_overhead",
                     "sandbox_tmp_size", "storage_min_free", "env_max_size",
                     "template_memory_budget", "template_min_available")
    @classmethod
    def _check_pinned(cls, value: str) -> str:
        parse_size(value)
        return value
