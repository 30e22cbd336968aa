"""`thaw up`, `thaw scheduler`, `thaw gateway`, `thaw agent`: the services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx

from thaw.client.credentials import DEV_URL_FILE
from thaw.core import eventloop
from thaw.core.config import AgentConfig, GatewayConfig, SchedulerConfig, default_home
from thaw.core.logs import configure_logging
from thaw.core.pki import GATEWAY, PKI_FOLDER, ensure_pki, internal_identity

from .settings import SETTINGS_HELP, parse_sets, settings_options

# How long `thaw up` waits for each service to come up before giving up.
SERVICE_START_SECONDS = 60.0
# Between SIGTERM and SIGKILL when `thaw up` shuts its services down; must cover the
# agent's drain (platform/server.py DRAIN_SECONDS) of short requests.
SHUTDOWN_GRACE_SECONDS = 40.0
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The examples `thaw up` deploys, with the modules each imports beyond the standard
# library: they run in this virtualenv (the base environment), where those come
# from the `examples` extra; one whose modules are missing is skipped, saying so.
# withdeps brings its own requirements.txt: the node builds its environment from the
# machine's package index (docs/environments.md); without one reachable it is not
# deployed, saying so, and the others are.
UP_EXAMPLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("echo", ()),
    ("embed", ("torch", "sentence_transformers")),
    ("tinylm", ("torch",)),
    ("withdeps", ()),
)


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    """Those of `modules` this interpreter cannot import (found without importing)."""
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def _logging(component: str, config: SchedulerConfig | GatewayConfig | AgentConfig) -> None:
    configure_logging(component, config.log_level, config.log_json)


@click.command(epilog=SETTINGS_HELP)
@click.option("--port-file", type=click.Path(path_type=Path), help="Write the bound port here.")
@click.option("--dev-key-file", type=click.Path(path_type=Path),
              help="Create the development API key once and keep it in this file.")
@settings_options
def scheduler(port_file: Path | None, dev_key_file: Path | None, sets: tuple[str, ...],
              config_file: Path | None) -> None:
    """Run the scheduler (gRPC, owns the metadata DB); settings: table [scheduler]."""
    from thaw.scheduler.server import serve

    config = SchedulerConfig.load(flags=parse_sets(sets), config_file=config_file)
    _logging("scheduler", config)
    asyncio.run(serve(config, dev_key_file, port_file))


@click.command(epilog=SETTINGS_HELP)
@click.option("--port-file", type=click.Path(path_type=Path), help="Write the bound port here.")
@click.option("--function-port-file", type=click.Path(path_type=Path),
              help="Write the function origin's bound port here.")
@settings_options
def gateway(port_file: Path | None, function_port_file: Path | None, sets: tuple[str, ...],
            config_file: Path | None) -> None:
    """Run the HTTP gateway; settings: table [gateway]."""
    from thaw.gateway.server import serve

    config = GatewayConfig.load(flags=parse_sets(sets), config_file=config_file)
    _logging("gateway", config)
    # Its certificate for the scheduler, checked before serving: without one the
    # gateway does not start.
    internal_identity(config, GATEWAY)
    eventloop.run(serve(config, port_file, function_port_file), use_uvloop=config.uvloop)


@click.command(epilog=SETTINGS_HELP)
@click.option("--port-file", type=click.Path(path_type=Path),
              help="Write 'CONTROL_PORT DATA_PORT' here once bound.")
@settings_options
def agent(port_file: Path | None, sets: tuple[str, ...], config_file: Path | None) -> None:
    """Run a node agent (gRPC control + HTTP data plane); settings: table [agent]."""
    # The agent forks instance processes; gRPC's fork handlers are not needed there
    # (children exec or never touch gRPC) and only log warnings.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from thaw.platform.server import serve

    config = AgentConfig.load(flags=parse_sets(sets), config_file=config_file)
    _logging("agent", config)
    eventloop.run(serve(config, port_file), use_uvloop=config.uvloop)


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], what: str,
                   log: Path | None = None) -> str:
    deadline = time.monotonic() + SERVICE_START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            where = f"see {log}" if log else "see its log above"
            raise click.ClickException(f"the {what} exited with code {proc.returncode}; "
                                       f"{where}")
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise click.ClickException(f"the {what} did not start within {SERVICE_START_SECONDS:.0f}s")


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


# Under $THAW_HOME: `thaw up`'s services log here, one file each.
SERVICE_LOGS = "service-logs"


class LocalPlatform:
    """The scheduler, an agent and the gateway as child processes of `thaw up`."""

    def __init__(self, home: Path, gateway_port: int | None, host_devices: str | None,
                 agents: int = 1, log_dir: Path | None = None) -> None:
        self.home = home
        self.log_dir = log_dir
        """Where each service's output goes (<name>.log); None: this process's own
        stdout and stderr."""
        self.gateway_port = gateway_port
        self.host_devices = host_devices
        self.agents = agents
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.url = ""
        """The gateway: the dashboard and the API."""
        self.function_url = ""
        """The function origin: function URLs (/fn/<tenant>/<name>)."""
        self.key = ""
        self.scheduler_address = ""
        self.agent_ports: dict[str, tuple[str, str]] = {}
        """Each agent's bound (control, data) ports, by node id."""

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        # Own session: a terminal's Ctrl-C reaches only `thaw up`, which then stops the
        # services in order; PDEATHSIG covers `thaw up` itself being killed.
        log = self.log_of(name)
        output = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            output = open(log, "ab")  # noqa: SIM115 (the child holds it; closed below)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "thaw.ops", *args],
                                    env={**os.environ, **env}, preexec_fn=_die_with_parent,
                                    start_new_session=True, stdout=output,
                                    stderr=subprocess.STDOUT if output else None)
        finally:
            if output is not None:
                output.close()
        self.procs.append((name, proc))
        return proc

    def log_of(self, name: str) -> Path | None:
        """The file service `name` ("scheduler", "agent local", ...) logs to, if any."""
        if self.log_dir is None:
            return None
        return self.log_dir / (name.replace(" ", "-") + ".log")

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        # The platform CA and each service's certificate, made once and reused: every
        # internal gRPC call is mutual TLS (the services find them under THAW_HOME).
        ensure_pki(self.home / PKI_FOLDER)
        env = {"THAW_HOME": str(self.home)}
        with tempfile.TemporaryDirectory() as tmp:
            ports = Path(tmp)
            sched = self._start("scheduler", [
                "scheduler", "--port-file", str(ports / "scheduler"),
                "--dev-key-file", str(self.home / "dev-key")],
                {**env, "THAW_SCHEDULER_LISTEN": "127.0.0.1:0"})
            bound = _wait_for_file(ports / "scheduler", sched, "scheduler",
                                   self.log_of("scheduler"))
            address = f"127.0.0.1:{bound}"
            self.scheduler_address = address
            for index in range(self.agents):
                node_id = "local" if self.agents == 1 else f"node{index}"
                self._start_agent(node_id, "0", "0")
        self._start_gateway({})
        self.key = (self.home / "dev-key").read_text().strip()

    def _start_agent(self, node_id: str, control_port: str, data_port: str) -> None:
        """Start the agent of `node_id` on these ports ("0": any free) and wait until it
        has bound them and registered; `agent_ports` then holds its ports."""
        env = {"THAW_HOME": str(self.home), "THAW_SCHEDULER_ADDRESS": self.scheduler_address,
               "THAW_AGENT_PORT": control_port, "THAW_DATA_PORT": data_port,
               "THAW_NODE_ID": node_id, **self.sandbox_env()}
        if self.host_devices:
            env["THAW_HOST_DEVICES"] = self.host_devices
        with tempfile.TemporaryDirectory() as tmp:
            port_file = Path(tmp) / f"agent-{node_id}"
            proc = self._start(f"agent {node_id}", [
                "agent", "--port-file", str(port_file)], env)
            control, data = _wait_for_file(port_file, proc, f"agent {node_id}",
                                           self.log_of(f"agent {node_id}")).split()
        self.agent_ports[node_id] = (control, data)

    def restart_agent(self, node_id: str = "local", kill: bool = False) -> None:
        """Stop the agent of `node_id` (SIGTERM, or SIGKILL with `kill`) and start a new
        one with the same node id on the same ports, as a supervisor restarting it would;
        returns once the new agent has registered. Its node must stay usable."""
        if not self._stop_one(f"agent {node_id}", kill):
            raise ValueError(f"no agent {node_id!r} in this platform")
        self._start_agent(node_id, *self.agent_ports[node_id])

    def _stop_one(self, name: str, kill: bool) -> bool:
        """Stop the service `name` (SIGTERM, SIGKILL after the grace, or SIGKILL at once
        with `kill`) and forget it; False if there is none."""
        for index, (proc_name, proc) in enumerate(self.procs):
            if proc_name != name:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    proc.wait(SHUTDOWN_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            del self.procs[index]
            return True
        return False

    def _start_gateway(self, env: dict[str, str]) -> None:
        """Start the gateway; `url` and `function_url` once both its ports are bound."""
        with tempfile.TemporaryDirectory() as tmp:
            ports = Path(tmp)
            gw = self._start("gateway", [
                "gateway", "--port-file", str(ports / "gateway"),
                "--function-port-file", str(ports / "functions")], {
                "THAW_HOME": str(self.home), "THAW_SCHEDULER_ADDRESS": self.scheduler_address,
                **self._gateway_port_env(), **env})
            bound = _wait_for_file(ports / "gateway", gw, "gateway", self.log_of("gateway"))
            self.url = f"http://127.0.0.1:{bound}"
            port = _wait_for_file(ports / "functions", gw, "gateway", self.log_of("gateway"))
            self.function_url = f"http://127.0.0.1:{port}"

    @property
    def sandboxed(self) -> bool:
        """Whether instances run in sandboxes: yes as root (the agent needs root to
        give tenants uids); otherwise `thaw up` turns the sandbox off, unless
        THAW_SANDBOX says what to do."""
        return os.environ.get("THAW_SANDBOX", "on" if os.geteuid() == 0 else "off") == "on"

    def sandbox_env(self) -> dict[str, str]:
        return {} if "THAW_SANDBOX" in os.environ or self.sandboxed else {"THAW_SANDBOX": "off"}

    def _gateway_port_env(self) -> dict[str, str]:
        # None: the gateway's own gateway_port setting (environment, config file, 8000).
        if self.gateway_port is None:
            return {}
        return {"THAW_GATEWAY_PORT": str(self.gateway_port)}

    def restart_gateway(self, kill: bool = False, env: dict[str, str] | None = None) -> None:
        """Stop the gateway (SIGTERM, or SIGKILL with `kill`) and start a new one on
        the same scheduler; `url` changes when the port was 0. What the gateway hands
        to the scheduler (stored invocations) must survive this."""
        self._stop_one("gateway", kill)
        self._start_gateway(env or {})

    def stop(self) -> None:
        # Front to back: stop taking requests, drain the node, then the control plane.
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(SHUTDOWN_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    click.echo(f"{name} did not stop in time; killing it", err=True)
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def _failed_example(name: str, folder: Path, reason: str) -> str:
    """One line saying an example's build failed and why (uv's message, on one line);
    for one with a requirements.txt, where its packages come from."""
    why = " ".join(reason.split())
    if len(why) > 400:
        why = why[:400] + "…"
    line = f"  {name:<8} not deployed: its build failed: {why or 'no reason given'}"
    if (folder / "requirements.txt").exists():
        line += ("\n           (its requirements.txt is installed from this machine's "
                 "package index: set THAW_ENV_INDEX_URL or pip's index-url; "
                 "docs/environments.md)")
    return line


def _print_tries(key: str, function_url: str, deployed: list[str]) -> None:
    """A curl line for each example that serves (its function URL, the dev key)."""
    auth = f"curl -s -H 'Authorization: Bearer {key}'"
    lines = []
    if "embed" in deployed:
        lines.append(f"{auth} -d '{{\"texts\": [\"hello world\"]}}' "
                     f"{function_url}/fn/dev/embed | head -c 300")
    elif "echo" in deployed:
        lines.append(f"{auth} -d '{{\"hello\": \"world\"}}' {function_url}/fn/dev/echo")
    if "tinylm" in deployed:
        lines.append(f"{auth} -H 'Content-Type: application/json' -d '{{\"model\": "
                     f"\"tinylm\", \"messages\": [{{\"role\": \"user\", \"content\": "
                     f"\"hi\"}}]}}' {function_url}/v1/chat/completions")
    if "withdeps" in deployed:
        lines.append(f"{auth} -d '{{\"sizes\": [123456789]}}' {function_url}/fn/dev/withdeps")
    if lines:
        click.echo("\ntry:\n" + "".join(f"  {line}\n" for line in lines))


@click.command()
@click.option("--port", type=int, default=None,
              help="Gateway port (0 = any free); default: the gateway_port setting (8000).")
@click.option("--examples/--no-examples", default=True, show_default=True,
              help="Deploy examples/echo, embed, tinylm and withdeps.")
@click.option("--host-devices", default=None, help="Virtual devices, e.g. 2x8GiB.")
@click.option("--log-to-terminal", is_flag=True,
              help="The services' logs on this terminal's stderr, mixed with the banner "
                   "(default: each in $THAW_HOME/service-logs/<service>.log).")
def up(port: int | None, examples: bool, host_devices: str | None,
       log_to_terminal: bool) -> None:
    """Start the whole local platform (SQLite, process runtime, host device, data in
    $THAW_HOME or ./.thaw), deploy the examples, print their URLs; Ctrl-C stops it.

    The banner (URLs, the API key) is the only thing on stdout; the services log to
    files under $THAW_HOME/service-logs. Later CLI calls default to this gateway's URL
    (--port included) and key."""
    from thaw.ops.client import Client, read_bundle_dir

    home = default_home()
    log_dir = None if log_to_terminal else home / SERVICE_LOGS
    platform = LocalPlatform(home, port, host_devices, log_dir=log_dir)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt

    # Installed explicitly: a shell that starts us in the background leaves SIGINT
    # ignored, and Ctrl-C must still stop everything.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        platform.start()
        # Later CLI calls without THAW_URL default to this gateway (the port may be
        # one given with --port, or any free one).
        (home / DEV_URL_FILE).write_text(platform.url + "\n")
        click.echo(f"\nthaw is up (data in {home})\n")
        click.echo(f"  dashboard     {platform.url}/")
        click.echo(f"  functions     {platform.function_url}/fn/<tenant>/<name>")
        click.echo(f"  API key       {platform.key}")
        click.echo(f"  certificates  {home / PKI_FOLDER} (internal mutual TLS)")
        click.echo("  instances     " + (
            "sandboxed, a uid per tenant (docs/isolation.md)" if platform.sandboxed else
            "NOT sandboxed: run as root for sandboxes (development only)"))
        click.echo(f"  metrics       {platform.url}/metrics (the operator's key)")
        click.echo("  service logs  " + (f"{log_dir}/ (scheduler, agent-local, gateway .log)"
                                         if log_dir else "on stderr"))
        click.echo("")
        if examples:
            client = Client(platform.url, platform.key, timeout=30)
            deployed: list[str] = []
            for name, modules in UP_EXAMPLES:
                folder = EXAMPLES / name
                if not folder.exists():
                    click.echo(f"  (examples/{name} not found next to the package; skipped)")
                    continue
                lacking = missing_modules(modules)
                if lacking:
                    click.echo(f"  examples/{name} skipped: needs {', '.join(lacking)} "
                               "(pip install 'thaw[examples]')")
                    continue
                click.echo(f"  deploying examples/{name} (snapshot build)…")
                try:
                    fn = client.deploy_bundle(read_bundle_dir(folder), wait=True)
                except (httpx.HTTPError, Exception) as exc:  # keep the platform up
                    click.echo(f"    failed: {exc}")
                    continue
                if fn.get("state") == "failed":
                    click.echo(_failed_example(name, folder, str(fn.get("reason") or "")))
                    continue
                note = f" — {fn['reason']}" if fn.get("reason") else ""
                if fn.get("unchanged"):
                    note += f" (unchanged, version {fn['version']} kept)"
                click.echo(f"  {name:<8} {fn['url']}   [{fn['state']}, "
                           f"{fn['start_mode']} starts]{note}")
                if fn.get("state") == "ready":
                    deployed.append(name)
            _print_tries(platform.key, platform.function_url, deployed)
        click.echo("Ctrl-C stops everything.")
        while all(proc.poll() is None for _n, proc in platform.procs):
            time.sleep(0.5)
        dead = [n for n, p in platform.procs if p.poll() is not None]
        logs = [str(platform.log_of(n)) for n in dead if platform.log_of(n)]
        click.echo(f"{', '.join(dead)} exited; shutting down"
                   + (f" (see {', '.join(logs)})" if logs else ""), err=True)
    except KeyboardInterrupt:
        click.echo("\nstopping…")
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            platform.stop()
    click.echo("stopped.")
