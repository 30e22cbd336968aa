"""ops/deploy carries internal mutual TLS: each workload mounts its own component's
certificate where the settings point, generated from the files `thaw pki init` writes;
the NetworkPolicy lets only the platform's pods reach its internal ports; no probe
speaks plaintext gRPC to a TLS port."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.scheduler.test_deploy import DEPLOY, by_kind, config_env, container, k8s_objects
from thaw.core.pki import ensure_pki

WORKLOADS = {"thaw-scheduler": "scheduler", "thaw-gateway": "gateway",
             "thaw-agent": "agent"}
TLS_FILES = {"THAW_TLS_CA": "ca.crt", "THAW_TLS_CERT": "tls.crt", "THAW_TLS_KEY": "tls.key"}


def workloads() -> dict[str, dict[str, Any]]:
    return {**by_kind("Deployment"), **by_kind("DaemonSet"), **by_kind("StatefulSet")}


def test_each_workload_mounts_its_own_components_secret_where_the_settings_point() -> None:
    env = config_env()
    mounts = {Path(env[var]).parent for var in TLS_FILES}
    assert len(mounts) == 1
    (mount,) = mounts
    assert {Path(env[var]).name for var in TLS_FILES} == set(TLS_FILES.values())
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    generated = {g["name"]: g for g in kustomization["secretGenerator"]}
    for name, component in WORKLOADS.items():
        workload = workloads()[name]
        c = container(workload)
        tls_mounts = [m for m in c["volumeMounts"] if m["mountPath"] == str(mount)]
        assert len(tls_mounts) == 1 and tls_mounts[0]["readOnly"] is True, name
        volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == tls_mounts[0]["name"])
        secret = volume["secret"]
        assert secret["secretName"] == f"thaw-tls-{component}"
        assert secret["defaultMode"] == 0o400
        files = dict(f.split("=", 1) for f in generated[secret["secretName"]]["files"])
        assert files == {"ca.crt": "pki/ca.crt", "tls.crt": f"pki/{component}.crt",
                         "tls.key": f"pki/{component}.key"}
        assert generated[secret["secretName"]]["type"] == "kubernetes.io/tls"
    # The CA's key is in no Secret.
    assert not any("ca.key" in f for g in generated.values() for f in g["files"])


def test_no_probe_speaks_plaintext_grpc() -> None:
    for name in WORKLOADS:
        c = container(workloads()[name])
        for probe in ("readinessProbe", "livenessProbe"):
            assert "grpc" not in c.get(probe, {}), f"{name} {probe}"


def _policy_ports(policy: dict[str, Any]) -> dict[int, set[str]]:
    """port -> the app names allowed to reach it ("*" = anyone)."""
    out: dict[int, set[str]] = {}
    for rule in policy["spec"].get("ingress", []):
        sources = {s["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                   for s in rule.get("from", [])} or {"*"}
        for port in rule["ports"]:
            out.setdefault(port["port"], set()).update(sources)
    return out


def test_only_the_platforms_pods_reach_its_internal_ports() -> None:
    policies = by_kind("NetworkPolicy")
    deny = policies["thaw-default-deny"]["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny
    by_target = {p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]:
                 _policy_ports(p) for name, p in policies.items() if name != "thaw-default-deny"}
    env = config_env()
    scheduler_port = int(env["THAW_SCHEDULER_LISTEN"].rsplit(":", 1)[1])
    assert by_target == {
        "thaw-scheduler": {scheduler_port: {"thaw-gateway", "thaw-agent"}},
        "thaw-agent": {int(env["THAW_AGENT_PORT"]): {"thaw-scheduler", "thaw-agent"},
                       int(env["THAW_DATA_PORT"]): {"thaw-gateway"}},
        "thaw-postgres": {5432: {"thaw-scheduler"}},
        "thaw-gateway": {int(env["THAW_GATEWAY_PORT"]): {"*"},
                         int(env["THAW_FUNCTION_PORT"]): {"*"}},
    }
    # Every pod of the namespace is under the default deny (no other namespace's).
    assert {o["metadata"]["namespace"] for o in k8s_objects()
            if o["kind"] == "NetworkPolicy"} == {"thaw"}


def test_compose_mounts_each_services_own_certificate() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        if name == "postgres":
            continue
        component = "agent" if name.startswith("agent") else name
        env = service["environment"]
        binds = {v["target"]: v["source"] for v in service["volumes"] if isinstance(v, dict)}
        assert binds == {env["THAW_TLS_CA"]: "./pki/ca.crt",
                         env["THAW_TLS_CERT"]: f"./pki/{component}.crt",
                         env["THAW_TLS_KEY"]: f"./pki/{component}.key"}, name
        for v in service["volumes"]:
            if isinstance(v, dict):  # a missing file fails the start, never a new dir
                assert v["read_only"] and v["bind"]["create_host_path"] is False
    assert "7070" not in str(services["scheduler"].get("ports", []))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize)")
def test_kustomize_builds_with_the_certificates_and_refuses_without(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(DEPLOY / "k8s", copy, ignore=shutil.ignore_patterns("pki"))
    refused = subprocess.run(["kubectl", "kustomize", str(copy)], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0 and "pki/" in refused.stderr
    ensure_pki(copy / "pki")
    built = subprocess.run(["kubectl", "kustomize", str(copy)], capture_output=True,
                           text=True, timeout=120, check=True)
    objects = list(yaml.safe_load_all(built.stdout))
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    tls = [s for name, s in secrets.items() if name.startswith("thaw-tls-")]
    assert len(tls) == 3 and all(s["type"] == "kubernetes.io/tls" for s in tls)
    assert all(set(s["data"]) == {"ca.crt", "tls.crt", "tls.key"} for s in tls)
    # The workloads name the generated (hashed) Secrets.
    mounted = {v["secret"]["secretName"] for o in objects
               if o["kind"] in ("Deployment", "DaemonSet")
               for v in o["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    assert mounted == {s["metadata"]["name"] for s in tls}


def test_probes_ask_the_health_endpoints() -> None:
    """Liveness asks /livez (no dependency), readiness /readyz, each on a plain-HTTP
    port the container declares (the gateway's own, the others' health listener)."""
    workloads = {**by_kind("Deployment"), **by_kind("DaemonSet")}
    for name in ("thaw-scheduler", "thaw-gateway", "thaw-agent"):
        c = container(workloads[name])
        declared = {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
        for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
            get = c[probe]["httpGet"]
            assert get["path"] == path, f"{name} {probe}"
            assert get["port"] in declared, f"{name} {probe}"
