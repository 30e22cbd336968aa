"""Where a function's gpu_compute share is not applied, its status says so: the gateway's
function JSON names the nodes without an MPS daemon and warns, `thaw fn status` prints
the warning, and `thaw node ls` notes each node without MPS."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from click.testing import CliRunner

from thaw.core.config import GatewayConfig
from thaw.gateway.state import CONFIG_KEY
from thaw.gateway.views import GPU_COMPUTE_NOT_ENFORCED, function_json, node_json
from thaw.ops import functions as functions_module
from thaw.ops import nodes as nodes_module
from thaw.proto import agent_pb2, scheduler_pb2


def function_doc(unenforced: list[str]) -> dict[str, Any]:
    app = web.Application()
    app[CONFIG_KEY] = GatewayConfig()
    request = make_mocked_request("GET", "/v1/functions/embed", app=app)
    info = scheduler_pb2.FunctionInfo(
        tenant="dev", name="embed", version="3", state="ready", start_mode="restore",
        config_json=json.dumps({"resources": {"gpu_compute": 25}}),
        gpu_compute_unenforced_nodes=unenforced)
    return function_json(request, info)


def test_the_function_json_warns_about_nodes_without_mps() -> None:
    doc = function_doc(["gpu-b", "gpu-c"])
    assert doc["gpu_compute_unenforced_nodes"] == ["gpu-b", "gpu-c"]
    [warning] = doc["warnings"]
    assert warning.startswith(f"{GPU_COMPUTE_NOT_ENFORCED} on gpu-b, gpu-c")
    assert function_doc([])["warnings"] == []


def test_the_node_json_says_whether_mps_runs() -> None:
    with_mps = scheduler_pb2.NodeInfo(id="a", telemetry=agent_pb2.NodeTelemetry(mps_active=True))
    assert node_json(with_mps)["mps_active"] is True
    assert node_json(scheduler_pb2.NodeInfo(id="b"))["mps_active"] is False


class FakeClient:
    replies: dict[str, Any] = {}

    def request(self, method: str, path: str) -> FakeClient:
        assert method == "GET"
        self.path = path
        return self

    def json(self) -> Any:
        return self.replies[self.path]


def test_fn_status_prints_the_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeClient.replies = {"/v1/functions/embed": function_doc(["gpu-b"])}
    monkeypatch.setattr(functions_module, "Client", FakeClient)
    result = CliRunner().invoke(functions_module.fn, ["status", "embed"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.strip().startswith("embed") and "ready" in line for line in lines)
    assert any(line.startswith("warning: gpu_compute not enforced on gpu-b")
               for line in lines)
    as_json = CliRunner().invoke(functions_module.fn, ["status", "embed", "--json"])
    assert json.loads(as_json.output)["gpu_compute_unenforced_nodes"] == ["gpu-b"]


def test_fn_status_without_warnings_prints_none(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeClient.replies = {"/v1/functions/embed": function_doc([])}
    monkeypatch.setattr(functions_module, "Client", FakeClient)
    result = CliRunner().invoke(functions_module.fn, ["status", "embed"])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output


def node(node_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": node_id, "state": "ready", "runtime": "process", "instances": 0,
            "devices": [], "disk_bytes": 0,
            "pinned": {"capacity_bytes": 0, "used_bytes": 0, "chunks": 0, "snapshots": 0,
                       "lock": "locked"}, **extra}


def test_node_ls_notes_the_nodes_without_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeClient.replies = {"/v1/nodes": {"nodes": [
        node("gpu-a", mps_active=True), node("gpu-b", mps_active=False),
        node("old-c")]}}  # a gateway that does not say: no note
    monkeypatch.setattr(nodes_module, "Client", FakeClient)
    result = CliRunner().invoke(nodes_module.node, ["ls"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "gpu-b: gpu_compute not enforced (no MPS daemon)" in lines
    assert not any(line.startswith(("gpu-a:", "old-c:")) for line in lines)
    assert nodes_module.GPU_COMPUTE_NOT_ENFORCED == GPU_COMPUTE_NOT_ENFORCED  # same words
