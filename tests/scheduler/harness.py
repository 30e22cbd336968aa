"""The three services as subprocesses, for tests that kill and restart them: the
scheduler listens on a fixed port (so a new one can take over the same address and
DB), agents can be SIGKILLed one by one. Same commands as LocalPlatform (`thaw
scheduler|agent|gateway`), each service's log in its own file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from thaw.core.httptls import local_client_context
from thaw.core.pki import PKI_FOLDER, ensure_pki
from thaw.ops.services import _die_with_parent, _wait_for_file

# Bounds for a test cluster: short heartbeats so a lost node is noticed in seconds.
FAST_ENV = {"THAW_HEARTBEAT_INTERVAL": "0.5", "THAW_NODE_TIMEOUT": "3",
            "THAW_RECONCILE_INTERVAL": "0.25", "THAW_LOG_LEVEL": "info"}
STOP_SECONDS = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ProcessCluster:
    def __init__(self, home: Path, agents: int = 1, host_devices: str = "1x2GiB",
                 env: dict[str, str] | None = None) -> None:
        self.home = home
        self.agent_count = agents
        self.host_devices = host_devices
        self.env = {**os.environ, "THAW_HOME": str(home), **FAST_ENV, **(env or {})}
        self.scheduler_address = f"127.0.0.1:{free_port()}"
        self.scheduler: Service | None = None
        self.gateway: Service | None = None
        self.agents: dict[str, Service] = {}
        self.data_urls: dict[str, str] = {}
        self.url = ""
        self.key = ""
        self._runs = 0

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> Service:
        self._runs += 1
        log = self.home / "logs" / f"{name.replace(' ', '-')}-{self._runs}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "thaw.ops", *args],
                                    env={**self.env, **env}, stdout=out,
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                    start_new_session=True)
        return Service(name, proc, log)

    def start_scheduler(self) -> None:
        port_file = self.home / "ports" / f"scheduler-{self._runs}"
        port_file.parent.mkdir(parents=True, exist_ok=True)
        self.scheduler = self._start("scheduler", [
            "scheduler", "--port-file", str(port_file),
            "--dev-key-file", str(self.home / "dev-key")],
            {"THAW_SCHEDULER_LISTEN": self.scheduler_address})
        _wait_for_file(port_file, self.scheduler.proc, "scheduler")

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        ensure_pki(self.home / PKI_FOLDER)  # internal mutual TLS, as `thaw up` makes it
        self.start_scheduler()
        for index in range(self.agent_count):
            node_id = f"node{index}"
            port_file = self.home / "ports" / f"agent-{node_id}"
            agent = self._start(f"agent {node_id}", [
                "agent", "--port-file", str(port_file)], {
                "THAW_SCHEDULER_ADDRESS": self.scheduler_address, "THAW_AGENT_PORT": "0",
                "THAW_DATA_PORT": "0", "THAW_NODE_ID": node_id,
                "THAW_HOST_DEVICES": self.host_devices})
            ports = _wait_for_file(port_file, agent.proc, f"agent {node_id}").split()
            self.agents[node_id] = agent
            self.data_urls[node_id] = f"https://127.0.0.1:{ports[1]}"
        port_file = self.home / "ports" / "gateway"
        self.gateway = self._start("gateway", ["gateway", "--port-file", str(port_file)], {
            "THAW_SCHEDULER_ADDRESS": self.scheduler_address, "THAW_GATEWAY_PORT": "0"})
        self.url = f"http://127.0.0.1:{_wait_for_file(port_file, self.gateway.proc, 'gateway')}"
        self.key = (self.home / "dev-key").read_text().strip()

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout,
                            headers={"Authorization": f"Bearer {self.key}"})

    def nodes(self, http: httpx.Client) -> dict[str, dict]:
        return {n["id"]: n for n in http.get("/v1/nodes").raise_for_status().json()["nodes"]}

    def agent_instances(self, node_id: str) -> list[dict]:
        # The data plane serves the gateway's certificate only (mutual TLS).
        reply = httpx.get(f"{self.data_urls[node_id]}/v1/instances", timeout=10,
                          verify=local_client_context(self.home))
        return list(reply.raise_for_status().json()["instances"])

    def logs(self) -> str:
        services = [s for s in (self.scheduler, self.gateway, *self.agents.values()) if s]
        return "\n".join(f"--- {s.name} ---\n{s.tail()}" for s in services)

    def stop(self) -> None:
        for service in (self.gateway, *self.agents.values(), self.scheduler):
            if service is not None:
                service.stop()


def wait_until(predicate, what: str, timeout: float = 15.0,  # type: ignore[no-untyped-def]
               interval: float = 0.1) -> float:
    """Poll until true; returns the seconds it took. Fails the test past `timeout`."""
    started = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
