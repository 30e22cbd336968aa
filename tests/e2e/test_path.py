"""The whole path, for real: upload a bundle over HTTP, the node builds a snapshot,
invoke the URL cold (restore, no setup()) and warm (DESIGN.md §2-§4; issue 2)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import EXAMPLES, FIXTURES, RunningPlatform
from tests.tls import sync_channel


def server_timing(header: str) -> dict[str, float]:
    stages = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        stages[name] = float(rest)
    return stages


def test_echo_deploy_then_cold_restore_then_warm(platform: RunningPlatform) -> None:
    resp = platform.deploy(EXAMPLES / "echo")
    assert resp.status_code == 201, resp.text
    fn = resp.json()
    assert fn["state"] == "ready" and fn["start_mode"] == "restore", fn
    # On the function origin (docs/keys-and-origins.md): the gateway's host, its own port.
    url, gateway = urlsplit(fn["url"]), urlsplit(platform.url)
    assert (url.hostname, url.path) == (gateway.hostname, "/fn/dev/echo")
    assert url.port != gateway.port
    assert fn["snapshot_bytes"] > 0

    cold = platform.invoke("echo", {"hello": "world"})
    assert cold.status_code == 200, cold.text
    assert cold.headers["X-Thaw-Start"] == "restore"
    stages = server_timing(cold.headers["Server-Timing"])
    assert {"queue", "restore", "run", "total"} <= stages.keys()
    # The stages do not overlap: together they fit in the total.
    assert sum(v for k, v in stages.items() if k != "total") <= stages["total"] + 1.0
    body = cold.json()
    assert body["echo"] == {"hello": "world"}
    # setup() ran in the build process, not in the restored instance.
    assert body["setup_pid"] != body["pid"]

    warm = platform.invoke("echo", {"n": 2})
    assert warm.headers["X-Thaw-Start"] == "warm"
    assert warm.json()["pid"] == body["pid"]
    assert "run" in server_timing(warm.headers["Server-Timing"])

    sub = platform.http.post("/fn/dev/echo/some/path", json={})
    assert sub.json()["path"] == "/some/path"


@pytest.mark.slow
def test_embed_restore_matches_fresh(platform: RunningPlatform, tmp_path: Path) -> None:
    resp = platform.deploy(EXAMPLES / "embed")
    assert resp.status_code == 201, resp.text
    assert resp.json()["state"] == "ready", resp.json()
    assert resp.json()["start_mode"] == "restore", resp.json()

    texts = ["a snapshot restore beats a fresh start", "hello world"]
    cold = platform.invoke("embed", {"texts": texts})
    assert cold.status_code == 200, cold.text
    assert cold.headers["X-Thaw-Start"] == "restore"
    restored = cold.json()
    assert restored["dimensions"] == 384
    assert restored["setup_runs"] == 1
    assert restored["setup_pid"] != restored["pid"], "setup() ran again on restore"

    warm = platform.invoke("embed", {"texts": texts})
    assert warm.headers["X-Thaw-Start"] == "warm"
    assert warm.json()["embeddings"] == restored["embeddings"]

    # The same bundle with snapshots off: every cold start runs setup() fresh.
    fresh_bundle = tmp_path / "embed-fresh"
    shutil.copytree(EXAMPLES / "embed", fresh_bundle)
    toml = (fresh_bundle / "thaw.toml").read_text().replace(
        'name = "embed"', 'name = "embed-fresh"')
    (fresh_bundle / "thaw.toml").write_text(toml + "\n[snapshot]\nenabled = false\n")
    resp = platform.deploy(fresh_bundle)
    assert resp.status_code == 201 and resp.json()["start_mode"] == "fresh", resp.text
    fresh = platform.invoke("embed-fresh", {"texts": texts})
    assert fresh.status_code == 200, fresh.text
    assert fresh.headers["X-Thaw-Start"] == "fresh"
    fresh_body = fresh.json()
    assert fresh_body["setup_pid"] == fresh_body["pid"]
    for a, b in zip(restored["embeddings"], fresh_body["embeddings"], strict=True):
        assert all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6)
                   for x, y in zip(a, b, strict=True))


def test_bad_uploads_are_clear_4xx(platform: RunningPlatform) -> None:
    resp = platform.deploy(FIXTURES / "no_toml")
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_bundle"
    assert "thaw.toml" in resp.json()["error"]["message"]

    resp = platform.deploy(FIXTURES / "bad_toml")
    assert resp.status_code == 400
    assert resp.json()["error"]["field"] == "thaw.toml"

    resp = platform.deploy(FIXTURES / "bad_handler_name")
    assert resp.status_code == 400
    assert resp.json()["error"]["field"] == "handler"

    resp = platform.http.post("/v1/functions", content=b"not a tarball")
    assert resp.status_code == 400
    assert resp.json()["error"]["field"] == "bundle"


def test_failed_builds_report_why_and_others_keep_serving(platform: RunningPlatform) -> None:
    assert platform.deploy(EXAMPLES / "echo").status_code == 201

    resp = platform.deploy(FIXTURES / "import_error")
    assert resp.status_code == 201
    fn = resp.json()
    assert fn["state"] == "failed"
    assert "import failed" in fn["reason"] and "a_module_that_does_not_exist" in fn["reason"]

    resp = platform.deploy(FIXTURES / "setup_raises")
    fn = resp.json()
    assert fn["state"] == "failed"
    assert "setup failed" in fn["reason"] and "the model file is missing" in fn["reason"]
    got = platform.http.get("/v1/functions/setup-raises").json()
    assert got["state"] == "failed" and got["reason"] == fn["reason"]

    call = platform.invoke("setup-raises")
    assert call.status_code == 503
    assert "the model file is missing" in call.json()["error"]["message"]

    ok = platform.invoke("echo", {"still": "serving"})
    assert ok.status_code == 200 and ok.json()["echo"] == {"still": "serving"}


def test_auth_and_unknown_functions(platform: RunningPlatform) -> None:
    anon = platform.http.post("/fn/dev/echo", json={}, headers={"Authorization": ""})
    assert anon.status_code == 401
    wrong = platform.http.post("/fn/dev/echo", json={},
                               headers={"Authorization": "Bearer thaw_not_a_key"})
    assert wrong.status_code == 401
    assert platform.invoke("nope").status_code == 404
    other_tenant = platform.http.post("/fn/someone-else/echo", json={})
    assert other_tenant.status_code == 404


def test_health_everywhere(platform: RunningPlatform) -> None:
    assert platform.http.get("/healthz").status_code == 200
    assert platform.http.get("/readyz").status_code == 200
    metrics = platform.http.get("/metrics").text
    assert "thaw_invocations_total" in metrics
    # Every gRPC server answers the standard health service.
    ports_checked = 0
    for name, proc in platform.platform.procs:
        if name == "gateway":
            continue
        import psutil

        for conn in psutil.Process(proc.pid).net_connections(kind="tcp"):
            if conn.status != psutil.CONN_LISTEN:
                continue
            # Mutual TLS, as the gateway: the scheduler's port or the agent's.
            channel = sync_channel(f"127.0.0.1:{conn.laddr.port}", platform.platform.home,
                                   "scheduler" if name == "scheduler" else "agent")
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5)
            except grpc.RpcError:
                continue  # the agent's HTTP data plane port
            finally:
                channel.close()
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            ports_checked += 1
    assert ports_checked == 2  # scheduler and agent
