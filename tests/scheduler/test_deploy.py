"""ops/deploy: the Kubernetes manifests and the compose file parse, run the one thaw
image with real subcommands, and use ports and THAW_* names the configs define."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from tests.conftest import REPO
from thaw.core.config import AgentConfig, GatewayConfig, SchedulerConfig, _ComponentConfig
from thaw.ops.cli import cli
from thaw.scheduler.policy import PolicyConfig

DEPLOY = REPO / "ops" / "deploy"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"ghcr.io/thaw/thaw:{VERSION}"
POSTGRES_IMAGE = "postgres:16"
CONFIGS: list[type[_ComponentConfig]] = [SchedulerConfig, GatewayConfig, AgentConfig,
                                         PolicyConfig]
try:  # the gateway's extra settings, where that module exists
    from thaw.gateway.config import GatewaySettings

    CONFIGS.append(GatewaySettings)
except ImportError:  # pragma: no cover
    pass
KNOWN_ENV = {"THAW_CONFIG"} | {f"THAW_{name.upper()}" for cls in CONFIGS
                               for name in cls.model_fields}
SERVICES = {"scheduler", "gateway", "agent"}


def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert "kind" in doc and "apiVersion" in doc, path
                objects.append(doc)
    return objects


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == kind}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(only)


def config_env() -> dict[str, str]:
    return {k: str(v) for k, v in by_kind("ConfigMap")["thaw-config"]["data"].items()}


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == files


def test_k8s_workloads_run_the_thaw_image_with_real_subcommands() -> None:
    workloads = {**by_kind("Deployment"), **by_kind("DaemonSet"), **by_kind("StatefulSet")}
    assert set(workloads) == {"thaw-scheduler", "thaw-gateway", "thaw-agent", "thaw-postgres"}
    assert container(workloads["thaw-postgres"])["image"] == POSTGRES_IMAGE
    for name in ("thaw-scheduler", "thaw-gateway", "thaw-agent"):
        c = container(workloads[name])
        assert c["image"] == IMAGE, name
        assert c["args"][0] == name.removeprefix("thaw-") and c["args"][0] in cli.commands
        assert {"configMapRef": {"name": "thaw-config"}} in c["envFrom"]
    assert workloads["thaw-scheduler"]["spec"]["replicas"] == 1  # single active replica
    assert workloads["thaw-scheduler"]["spec"]["strategy"]["type"] == "Recreate"
    agent = container(workloads["thaw-agent"])
    assert agent["resources"]["limits"]["nvidia.com/gpu"] >= 1
    from_fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
                   for e in agent["env"] if "valueFrom" in e}
    assert from_fields == {"THAW_NODE_ID": "spec.nodeName", "THAW_AGENT_HOST": "status.podIP"}


def test_k8s_ports_match_the_configured_ones() -> None:
    env = config_env()
    workloads = {**by_kind("Deployment"), **by_kind("DaemonSet"), **by_kind("StatefulSet")}
    services = by_kind("Service")

    def ports(name: str) -> set[int]:
        return {p["containerPort"] for p in container(workloads[name])["ports"]}

    def health_port(name: str, key: str) -> int:
        # The health listener's port, set on the container (core/health_http.py).
        value = next(e["value"] for e in container(workloads[name])["env"]
                     if e["name"] == key)
        return int(value.rsplit(":", 1)[1])

    scheduler_port = int(env["THAW_SCHEDULER_LISTEN"].rsplit(":", 1)[1])
    assert ports("thaw-scheduler") == {
        scheduler_port, health_port("thaw-scheduler", "THAW_SCHEDULER_HEALTH_LISTEN")}
    assert ports("thaw-gateway") == {int(env["THAW_GATEWAY_PORT"]),
                                     int(env["THAW_FUNCTION_PORT"])}
    assert ports("thaw-agent") == {int(env["THAW_AGENT_PORT"]), int(env["THAW_DATA_PORT"]),
                                   health_port("thaw-agent", "THAW_AGENT_HEALTH_LISTEN")}
    assert ports("thaw-postgres") == {5432}
    # Clients reach the scheduler and PostgreSQL through their Services.
    host, port = env["THAW_SCHEDULER_ADDRESS"].split(":")
    assert host in services and services[host]["spec"]["ports"][0]["targetPort"] == int(port)
    assert services["thaw-gateway"]["spec"]["ports"][0]["targetPort"] == int(
        env["THAW_GATEWAY_PORT"])
    # Function URLs have a Service (an address, an origin) of their own.
    assert services["thaw-functions"]["spec"]["ports"][0]["targetPort"] == int(
        env["THAW_FUNCTION_PORT"])
    assert services["thaw-functions"]["spec"]["selector"] == \
        services["thaw-gateway"]["spec"]["selector"]
    agent = container(workloads["thaw-agent"])
    assert agent["securityContext"] == {"privileged": True}  # its instances' sandboxes
    assert all("securityContext" not in container(workloads[name])
               for name in ("thaw-scheduler", "thaw-gateway"))
    db_url = next(e["value"] for e in container(workloads["thaw-scheduler"])["env"]
                  if e["name"] == "THAW_DATABASE_URL")
    assert db_url.startswith("postgresql+psycopg://") and "@thaw-postgres:5432/" in db_url
    for name in ("thaw-scheduler", "thaw-gateway", "thaw-agent", "thaw-postgres"):
        selector = workloads[name]["spec"]["selector"]["matchLabels"]
        assert workloads[name]["spec"]["template"]["metadata"]["labels"] == selector
        if name in services:
            assert services[name]["spec"]["selector"] == selector


def test_every_thaw_variable_is_one_the_configs_read_and_the_values_load(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = config_env()
    names = set(env)
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            names |= {e["name"] for e in container(obj).get("env", [])}
    for service in yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"].values():
        names |= set(service.get("environment", {}))
    unknown = sorted(n for n in names if n.startswith("THAW_") and n not in KNOWN_ENV)
    assert not unknown, f"not read by any config: {unknown}"
    for key in list(os.environ):
        if key.startswith("THAW_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("THAW_HOME", str(tmp_path))
    for cls in CONFIGS:
        cls.load()  # a bad value would raise InvalidArgument naming its key
    assert AgentConfig.load().device == "cuda"


def test_compose_runs_a_two_agent_cluster_on_postgres() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"postgres", "scheduler", "gateway", "agent1", "agent2"}
    assert services["postgres"]["image"] == POSTGRES_IMAGE
    for name, service in services.items():
        if name == "postgres":
            continue
        assert service["image"] == IMAGE
        assert service["build"]["dockerfile"] == "ops/deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).exists()
        command = service["command"][0]
        assert command in cli.commands and command in SERVICES
        env = service["environment"]
        assert env["THAW_SCHEDULER_ADDRESS"] == "scheduler:7070"
    scheduler = services["scheduler"]["environment"]
    assert scheduler["THAW_SCHEDULER_LISTEN"].endswith(":7070")
    assert scheduler["THAW_DATABASE_URL"] == "postgresql+psycopg://thaw:thaw@postgres:5432/thaw"
    gateway_port = services["gateway"]["environment"]["THAW_GATEWAY_PORT"]
    function_port = services["gateway"]["environment"]["THAW_FUNCTION_PORT"]
    assert function_port != gateway_port  # function URLs on an origin of their own
    assert services["gateway"]["ports"] == [f"8000:{gateway_port}", f"8001:{function_port}"]
    for agent in ("agent1", "agent2"):
        # Its instances' sandboxes need mounts, namespaces and uid changes.
        assert services[agent]["privileged"] is True
    assert not any(services[name].get("privileged") for name in ("scheduler", "gateway"))
    for agent in ("agent1", "agent2"):
        env = services[agent]["environment"]
        # Each agent advertises its own service name, reachable from the others.
        assert env["THAW_NODE_ID"] == env["THAW_AGENT_HOST"] == agent
        assert env["THAW_DEVICE"] == "host"


def test_the_image_is_built_from_the_dockerfile_with_the_project_version() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"-t {IMAGE} " in dockerfile
    assert 'ENTRYPOINT ["thaw"]' in dockerfile
    assert '".[postgres]"' in dockerfile  # psycopg for THAW_DATABASE_URL
